"""P1: how much faster a distillation epoch is with cached targets than with the teacher run online.

Measured in one run: one `kdpipe distill` epoch with `--online-teacher` and one reading the cache (targets in RAM),
and, on the same batches in memory, the bare teacher forward and the bare student step, giving the ideal speed-up
(teacher forward + student step) / student step. Target: measured speed-up >= 0.9 x ideal.

    python benchmarks/p1_cache_speedup.py [--num-images 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.layout import DISTILL_SUMMARY
from workload import (
    STUDENT,
    TEACHER,
    TEACHER_TAPS,
    Timer,
    extract_split,
    kdpipe,
    setup_threads,
    speed_flags,
    teacher_checkpoint,
)

BATCH = 128
P1_TAPS = ["--layers", ",".join(TEACHER_TAPS), "--no-logits"]  # the store P1 distills from: the paired taps only
IDEAL_BATCHES = 12


def ideal_speedup(
    store: Path,
    checkpoint: str,
    device: str = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    batches: int = IDEAL_BATCHES,
    *,
    teacher_name: str = TEACHER,
    teacher_taps: Sequence[str] = TEACHER_TAPS,
    student_name: str = STUDENT,
    model_kwargs: dict | None = None,
    student_layers: Sequence[str] = (),
    batch_size: int = BATCH,
) -> tuple[float, float, float]:
    """(teacher forward s/batch, student step s/batch, ideal ratio) on `batches` in-memory batches, at the given
    precision; the workload's models and taps unless told otherwise (10 classes, 32-px images)."""
    import torch

    from cache.store import FeatureStore
    from pipeline.distillation.losses import TermSetup
    from pipeline.distillation.methods import Distiller, get_method
    from pipeline.distillation.pairing import student_taps
    from pipeline.engine.precision import Precision
    from pipeline.engine.recipe import adamw_onecycle
    from pipeline.engine.training import OnlineTeacher
    from pipeline.models.taps import Tap
    from pipeline.models.zoo import create_model, load_teacher

    setup_threads()
    precision = Precision(torch.device(device), amp, channels_last, training=True)
    feature_store = FeatureStore.open(store)
    taps = {t["name"]: Tap.from_record(t) for t in feature_store.meta["identity"]["taps"]}
    teacher_model = precision.model(load_teacher(teacher_name, checkpoint, False, None, 10, 32)[0])
    teacher = OnlineTeacher(teacher_model, list(teacher_taps))
    student = create_model(student_name, 10, model_kwargs=model_kwargs)
    method = precision.model(
        Distiller(
            student,
            get_method("feature"),
            TermSetup(
                student_taps(student, 32, tuple(student_layers), len(teacher_taps)), [taps[t] for t in teacher_taps]
            ),
        )
    )
    optimizer, schedule = adamw_onecycle(method.parameters(), 0.05, 0.01, 10 * batches)
    images = [precision.batch(torch.randn(batch_size, 3, 32, 32)) for _ in range(batches + 1)]
    method.train()
    forward_seconds = step_seconds = 0.0
    for i, x in enumerate(images):  # interleaved as in an online epoch; the first pass is an untimed warm-up
        with Timer() as forward, precision.autocast():
            targets = teacher(x)  # by store path, as the cache would give them
        with Timer() as step:
            with precision.autocast():
                loss = sum(method(x, targets)[1].values())
            precision.step(loss, optimizer)
            schedule.step()
        if i:
            forward_seconds, step_seconds = forward_seconds + forward.seconds, step_seconds + step.seconds
    t_forward, t_step = forward_seconds / batches, step_seconds / batches
    return t_forward, t_step, (t_forward + t_step) / t_step


def distill_epoch(
    store: Path,
    out: Path,
    device: str = "cpu",
    flags: Sequence[str] = (),
    online: bool = False,
    *,
    teacher_taps: Sequence[str] = TEACHER_TAPS,
    student_name: str = STUDENT,
    batch_size: int = BATCH,
) -> dict:
    """One `kdpipe distill` epoch of the workload's student (by default) from `store` (or its teacher online), `flags`
    added; its log row."""
    kdpipe(
        "distill",
        str(store),
        "--student",
        student_name,
        "--teacher-layers",
        ",".join(teacher_taps),
        "--epochs",
        "1",
        "--batch-size",
        str(batch_size),
        "--device",
        device,
        "--out",
        str(out),
        *(["--online-teacher"] if online else []),
        *flags,
    )
    return json.loads((out / DISTILL_SUMMARY).read_text())["final"]


def cache_speedup(
    store: Path,
    checkpoint: str,
    folder: Path,
    device: str = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    ideal_batches: int = IDEAL_BATCHES,
) -> dict[str, float]:
    """P1's figures: an epoch online and one cached (seconds, img/s), the ideal from in-memory batches, their ratio."""
    flags = speed_flags(amp, channels_last)
    cached = distill_epoch(store, folder / "cached", device, flags)
    online = distill_epoch(store, folder / "online", device, flags, online=True)
    t_forward, t_step, ideal = ideal_speedup(store, checkpoint, device, amp, channels_last, ideal_batches)
    measured = online["seconds"] / cached["seconds"]
    return {
        "online_seconds": online["seconds"],
        "cached_seconds": cached["seconds"],
        "online_images_per_second": online["images_per_second"],
        "cached_images_per_second": cached["images_per_second"],
        "speedup": round(measured, 3),
        "teacher_forward_ms": round(t_forward * 1000, 2),
        "student_step_ms": round(t_step * 1000, 2),
        "ideal_speedup": round(ideal, 3),
        "measured_over_ideal": round(measured / ideal, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = teacher_checkpoint(tmp)
        extract_split(tmp / "store", checkpoint, args.num_images, flags=P1_TAPS)
        p1 = cache_speedup(tmp / "store", checkpoint, tmp)
    print(f"{TEACHER} -> {STUDENT}, taps {', '.join(TEACHER_TAPS)}, {args.num_images} images, batch {BATCH}")
    print(
        f"epoch: online teacher {p1['online_seconds']:.1f} s, cached targets {p1['cached_seconds']:.1f} s -> "
        f"speed-up {p1['speedup']:.2f}x"
    )
    print(
        f"ideal: (teacher forward {p1['teacher_forward_ms']:.0f} ms + student step {p1['student_step_ms']:.0f} ms) "
        f"/ student step = {p1['ideal_speedup']:.2f}x"
    )
    print(f"P1 measured / ideal speed-up: {p1['measured_over_ideal']:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
