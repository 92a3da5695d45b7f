"""P13: images/s a JPEG ImageFolder sustains at 224 px through kdpipe's own dataset and loader with 0, 1 and 2
workers, against the teacher's forward on the same batches, in one run; and where one image's loading time goes.

The folder (`jpeg_folder.py`): 1,200 photo-sized JPEGs (width 360-440, height 320-380 px, quality 90) of the
embedded digits over noisy colour textures. They load as `kdpipe extract` loads them: `load_split("imagefolder")`
served with the teacher's preprocessing (timm's: resize the shorter side to 224 / crop_pct, bicubic, centre crop 224,
normalise), batches of 64 from `make_loader` (spawned workers). The teacher (random weights, 2 torch threads) runs on
the first batches the loader gave. Each loader rate is a second full epoch (the workers persist), after a first that
starts the workers; the stage times are one image at a time on one thread, as a worker runs them.

On this 2-core machine the workers share the cores with each other and with anything else running (a teacher on
the CPU too): the per-stage sum says what one worker per core sustains where it has the core to itself.

    python benchmarks/p13_loading.py [--per-class 120] [--teacher timm:resnet50] [--stage-images 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `kdpipe extract` runs (pipeline/__init__.py), before torch
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from jpeg_folder import write_digit_folder  # noqa: E402
from workload import Timer, setup_threads  # noqa: E402

BATCH = 64
INPUT_SIZE = 224
PHOTO_SIZES = ((360, 440), (320, 380))  # (width, height) ranges, about an ImageNet photo's
JPEG_QUALITY = 90
WORKER_COUNTS = (0, 1, 2)


def loader_rate(data, workers: int) -> tuple[float, float]:
    """(images/s over a full epoch with `workers` workers, seconds to the first batch of the epoch before it)."""
    from pipeline.engine.recipe import make_loader

    loader = make_loader(data, BATCH, workers=workers)
    with Timer() as start:
        batches = iter(loader)
        next(batches)
    for _ in batches:  # the rest of the first epoch
        pass
    with Timer() as epoch:
        for _ in loader:
            pass
    del batches, loader  # ends the persistent workers before the next count's
    return len(data) / epoch.seconds, start.seconds


def first_batches(data, count: int) -> list[torch.Tensor]:
    from pipeline.engine.recipe import make_loader

    batches = []
    for images, _ in make_loader(data, BATCH):
        batches.append(images)
        if len(batches) == count:
            return batches
    return batches


@torch.no_grad()
def forward_rate(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model(batches[0][:8])  # first-call allocations out of the timing
    with Timer() as timer:
        for images in batches:
            model(images)
    return sum(len(b) for b in batches) / timer.seconds


def stage_seconds(data, num_images: int) -> dict[str, float]:
    """Seconds per image of each loading stage, one image at a time on one thread (a worker's setting), with the
    dataset's own loader and transforms: decode (PIL open + convert to RGB), to tensor, resize, centre crop,
    to float and normalise; then collation of batches of 64."""
    from torchvision.datasets.folder import pil_loader

    to_tensor, resize, crop = data.preprocessing.geometry().transforms
    steps = {"to tensor": to_tensor, "resize": resize, "centre crop": crop, "normalise": data.preprocessing.normalize()}
    seconds = dict.fromkeys(["decode", *steps, "collate"], 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    served = []
    for path, label in data.images.samples[:num_images]:
        start = time.perf_counter()
        image = pil_loader(path)
        seconds["decode"] += time.perf_counter() - start
        for name, step in steps.items():
            start = time.perf_counter()
            image = step(image)
            seconds[name] += time.perf_counter() - start
        served.append((image, label))
    for first in range(0, len(served), BATCH):
        start = time.perf_counter()
        default_collate(served[first : first + BATCH])
        seconds["collate"] += time.perf_counter() - start
    torch.set_num_threads(threads)
    return {name: total / len(served) for name, total in seconds.items()}


def main() -> None:
    from pipeline.data.datasets import load_split
    from pipeline.models.zoo import create_model, served_preprocessing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=120, help="Images per digit class (10 classes).")
    parser.add_argument("--teacher", default="timm:resnet50")
    parser.add_argument("--forward-batches", type=int, default=3)
    parser.add_argument("--stage-images", type=int, default=300)
    args = parser.parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as tmp:
        jpeg_bytes = write_digit_folder(Path(tmp), {"train": args.per_class}, PHOTO_SIZES, JPEG_QUALITY)
        model = create_model(args.teacher, 10).eval()
        data = load_split("imagefolder", "train", tmp, INPUT_SIZE)
        data = data.with_preprocessing(served_preprocessing(args.teacher, model, data.preprocessing, "model"))
        loading = {workers: loader_rate(data, workers) for workers in WORKER_COUNTS}
        batches = first_batches(data, args.forward_batches)
        forward = forward_rate(model, batches)
        stages = stage_seconds(data, args.stage_images)

    prep = data.preprocessing
    print(
        f"{len(data)} JPEGs, {PHOTO_SIZES[0][0]}-{PHOTO_SIZES[0][1]} x {PHOTO_SIZES[1][0]}-{PHOTO_SIZES[1][1]} px, "
        f"quality {JPEG_QUALITY}, {jpeg_bytes / len(data) / 1024:.0f} KiB each; served at {INPUT_SIZE} px "
        f"({prep.interpolation}, crop_pct {prep.crop_pct}), batch {BATCH}, {torch.get_num_threads()} torch threads"
    )
    for workers, (rate, start) in loading.items():
        print(f"loader, {workers} workers: {rate:7.1f} img/s  (first batch after {start:.1f} s)")
    forwarded = sum(len(b) for b in batches)
    print(f"{args.teacher} forward (random weights) on the first {forwarded} of those images: {forward:.1f} img/s")
    per_image = sum(stages.values())
    print(f"one image, one thread ({args.stage_images} images): {per_image * 1e3:.2f} ms")
    for name, seconds in stages.items():
        print(f"  {name:12s} {seconds * 1e3:6.2f} ms  {seconds / per_image:5.1%}")
    print(
        f"one worker per core sustains {1 / per_image:.0f} img/s per core ({2 / per_image:.0f} on this machine's 2 "
        f"cores with nothing else on them); here the workers share the 2 cores with each other and the machine's load"
    )
    ratios = ", ".join(f"{w} workers {rate / forward:.2f}" for w, (rate, _) in loading.items())
    print(f"P13 loader / {args.teacher} forward images/s: {ratios}")


if __name__ == "__main__":
    main()
