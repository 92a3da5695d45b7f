"""P3: cached-target loader throughput (images + targets, as distill pairs them) against the student's step rate.

Both loader paths are measured: targets held in RAM, and streamed by chunk with block-shuffled windows under a
memory budget. Target: each path >= 3x the student's training-step rate.

    python benchmarks/p3_loader.py [--num-images 10000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from workload import DATASET, STUDENT, TEACHER_TAPS, Timer, setup_threads

TAP_SHAPES = {"layer2.1": (128, 16, 16), "layer3.1": (256, 8, 8), "layer4.1": (512, 4, 4)}  # resnet18_cifar
BATCH = 128
STREAM_BUDGET = 64 << 20


def build_store(path: Path, num_images: int):
    """A complete store with the workload's three teacher taps (random values: loading speed ignores them)."""
    from cache.store import ArraySpec, FeatureStore
    from pipeline.data.datasets import load_split

    data = load_split(DATASET, "train")
    identity = {"teacher": {"name": "bench"}, "taps": [], "dataset": {"name": DATASET, "num_classes": 10}}
    store = FeatureStore.create(path, {"identity": identity, "config_hash": "bench"})
    specs = [ArraySpec(f"features/{t}", s, "float16") for t, s in TAP_SHAPES.items()]
    specs.append(ArraySpec("indices", (), "int64", sets_block=False))
    part = store.create_split("train", num_images, specs, list(TAP_SHAPES), {"dataset_size": len(data)})
    rng = np.random.default_rng(0)
    for tap, shape in TAP_SHAPES.items():
        for start in range(0, num_images, part.block_rows):
            stop = min(start + part.block_rows, num_images)
            part.feature(tap)[start:stop] = rng.standard_normal((stop - start, *shape), dtype=np.float32)
    part.array("indices")[:] = np.arange(num_images)
    return part, data


def loader_rate(part, data, memory_bytes: int) -> tuple[float, bool]:
    """Samples/s of one epoch of paired image + target batches, exactly as distill iterates them."""
    from cache.reader import CachedTargets
    from pipeline.data.augment import ViewImages
    from pipeline.engine.recipe import make_loader

    targets = CachedTargets(part, [f"features/{t}" for t in TAP_SHAPES], memory_bytes)
    windows = targets.epoch_order(np.random.default_rng(0))
    order = np.concatenate(windows)
    keys = np.stack([order, np.zeros_like(order)], 1)  # every row under view 0, the plain image
    batches = keys[: len(order) - len(order) % BATCH].reshape(-1, BATCH, 2).tolist()
    images = make_loader(ViewImages(data, indices=part.array("indices")[:]), batch_sampler=batches)
    with Timer() as timer:
        for (_, _, rows, _), (target_rows, _, values) in zip(images, targets.batches(windows, BATCH), strict=True):
            assert np.array_equal(rows.numpy(), target_rows)
            [torch.from_numpy(v) for v in values]
    return len(batches) * BATCH / timer.seconds, targets.in_memory


def student_step_rate(num_batches: int = 8) -> float:
    """Images/s of the feature-distillation training step of the workload's student."""
    from pipeline.distillation.losses import TermSetup
    from pipeline.distillation.methods import Distiller, get_method
    from pipeline.distillation.pairing import student_taps
    from pipeline.models.taps import Tap
    from pipeline.models.zoo import create_model

    student = create_model(STUDENT, 10)
    teacher_taps = [Tap(i, t, TAP_SHAPES[t]) for i, t in enumerate(TEACHER_TAPS)]
    setup = TermSetup(student_taps(student, 32, (), len(teacher_taps)), teacher_taps)
    method = Distiller(student, get_method("feature"), setup).train()
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    x = torch.randn(BATCH, 3, 32, 32)
    targets = {
        path: torch.randn(BATCH, *s) for path, s in zip(method.teacher_targets, TAP_SHAPES.values(), strict=True)
    }
    with Timer() as timer:
        for _ in range(num_batches):
            loss = sum(method(x, targets)[1].values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return num_batches * BATCH / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    args = parser.parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as tmp:
        part, data = build_store(Path(tmp) / "store.zarr", args.num_images)
        step = student_step_rate()
        ram, in_memory = loader_rate(part, data, 1 << 40)
        streamed, streamed_in_memory = loader_rate(part, data, STREAM_BUDGET)
    assert in_memory and not streamed_in_memory
    print(f"{args.num_images} images, taps {', '.join(f'{t} {s}' for t, s in TAP_SHAPES.items())}, batch {BATCH}")
    print(
        f"student step {step:.0f} img/s; loader in RAM {ram:.0f} img/s ({ram / step:.1f}x); "
        f"streamed under {STREAM_BUDGET >> 20} MiB {streamed:.0f} img/s ({streamed / step:.1f}x)"
    )
    print(f"P3 slower loader path / student step: {min(ram, streamed) / step:.1f}x (target >= 3)")


if __name__ == "__main__":
    main()
