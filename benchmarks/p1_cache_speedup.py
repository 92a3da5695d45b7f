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
from pathlib import Path

import torch

from pipeline.layout import DISTILL_SUMMARY
from workload import DATASET, STUDENT, TEACHER, TEACHER_TAPS, Timer, kdpipe, setup_threads, teacher_checkpoint

BATCH = 128
IDEAL_BATCHES = 12


def ideal_speedup(store: Path, checkpoint: str) -> tuple[float, float, float]:
    """(teacher forward s/batch, student step s/batch, ideal ratio) on in-memory batches."""
    from cache.store import FeatureStore
    from pipeline.methods import Distiller, get_method
    from pipeline.models import create_model, load_teacher
    from pipeline.pairing import student_taps
    from pipeline.recipe import adamw_onecycle
    from pipeline.taps import Tap
    from pipeline.training import OnlineTeacher

    setup_threads()
    feature_store = FeatureStore.open(store)
    taps = {t["name"]: Tap.from_record(t) for t in feature_store.meta["identity"]["taps"]}
    teacher = OnlineTeacher(load_teacher(TEACHER, checkpoint, False, None, 10, 32)[0], list(TEACHER_TAPS))
    student = create_model(STUDENT, 10)
    method = Distiller(
        student,
        get_method("feature"),
        student_taps(student, 32, (), len(TEACHER_TAPS)),
        [taps[t] for t in TEACHER_TAPS],
    )
    optimizer, schedule = adamw_onecycle(method.parameters(), 0.05, 0.01, 10 * IDEAL_BATCHES)
    images = [torch.randn(BATCH, 3, 32, 32) for _ in range(IDEAL_BATCHES + 1)]
    method.train()
    forward_seconds = step_seconds = 0.0
    for i, x in enumerate(images):  # interleaved as in an online epoch; the first pass is an untimed warm-up
        with Timer() as forward:
            targets = dict(zip(method.teacher_targets, teacher(x), strict=True))
        with Timer() as step:
            loss = sum(method(x, targets)[1].values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if i:
            forward_seconds, step_seconds = forward_seconds + forward.seconds, step_seconds + step.seconds
    t_forward, t_step = forward_seconds / IDEAL_BATCHES, step_seconds / IDEAL_BATCHES
    return t_forward, t_step, (t_forward + t_step) / t_step


def epoch_seconds(run: Path) -> float:
    return json.loads((run / DISTILL_SUMMARY).read_text())["final"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = teacher_checkpoint(tmp)
        subset = ["--max-samples", str(args.num_images)] if args.num_images < 10_000 else []
        kdpipe(
            "extract",
            "--teacher",
            TEACHER,
            "--dataset",
            DATASET,
            "--checkpoint",
            checkpoint,
            "--layers",
            ",".join(TEACHER_TAPS),
            "--no-logits",
            "--device",
            "cpu",
            "--out",
            str(tmp / "store"),
            *subset,
        )
        common = [
            "--student",
            STUDENT,
            "--teacher-layers",
            ",".join(TEACHER_TAPS),
            "--epochs",
            "1",
            "--batch-size",
            str(BATCH),
            "--device",
            "cpu",
        ]
        kdpipe("distill", str(tmp / "store"), *common, "--out", str(tmp / "cached"))
        kdpipe("distill", str(tmp / "store"), *common, "--online-teacher", "--out", str(tmp / "online"))
        cached, online = epoch_seconds(tmp / "cached"), epoch_seconds(tmp / "online")
        t_forward, t_step, ideal = ideal_speedup(tmp / "store", checkpoint)
    measured = online / cached
    print(f"{TEACHER} -> {STUDENT}, taps {', '.join(TEACHER_TAPS)}, {args.num_images} images, batch {BATCH}")
    print(f"epoch: online teacher {online:.1f} s, cached targets {cached:.1f} s -> speed-up {measured:.2f}x")
    print(
        f"ideal: (teacher forward {t_forward * 1000:.0f} ms + student step {t_step * 1000:.0f} ms) / student step "
        f"= {ideal:.2f}x"
    )
    print(f"P1 measured / ideal speed-up: {measured / ideal:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
