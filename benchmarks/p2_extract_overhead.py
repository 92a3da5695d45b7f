"""P2: `kdpipe extract` throughput against the bare teacher forward on the same batches (target >= 0.9).

Each side runs in its own process. The bare side runs the teacher over the images recording every tap and
discards them; `kdpipe extract` (the real CLI) also converts every tap to float16, checks it, compresses it and
writes it through the background writer.

    python benchmarks/p2_extract_overhead.py [--num-images 10000] [--batch-size 64] [--compression C]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from workload import DATASET, TEACHER, Timer, extract_split, setup_threads, teacher_checkpoint


def teacher_forward(
    checkpoint: str,
    num_images: int,
    batch_size: int,
    device: str = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    *,
    teacher: str = TEACHER,
    dataset: str = DATASET,
):
    """The teacher recording every tap (a TapRecorder to enter), the loader of the batches extraction sees (the first
    `num_images` of the dataset's train split), and the Precision extraction runs them at (device, autocast, memory
    layout); the workload's teacher and dataset unless told otherwise."""
    import torch
    from torch.utils.data import Subset

    from pipeline.data.datasets import load_split
    from pipeline.engine.precision import Precision
    from pipeline.engine.recipe import make_loader
    from pipeline.models.taps import TapRecorder, list_taps
    from pipeline.models.zoo import load_teacher

    setup_threads()
    precision = Precision(torch.device(device), amp, channels_last)
    data = load_split(dataset, "train")
    model = precision.model(load_teacher(teacher, checkpoint, False, None, 10, 32)[0]).eval()
    taps = [t.name for t in list_taps(model, 32)]
    loader = make_loader(Subset(data, list(range(num_images))), batch_size, pin_memory=precision.pin_memory)
    return TapRecorder(model, taps), loader, precision


def bare_forward_rate(
    checkpoint: str,
    num_images: int,
    batch_size: int,
    device: str = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    *,
    teacher: str = TEACHER,
    dataset: str = DATASET,
) -> float:
    """Images/s of the teacher forward alone, recording every tap, on the batches extraction sees (loaded, copied to
    the device and run at the given precision as extraction does)."""
    import torch

    recorder, loader, precision = teacher_forward(
        checkpoint, num_images, batch_size, device, amp, channels_last, teacher=teacher, dataset=dataset
    )
    with torch.no_grad(), precision.autocast(), recorder, Timer() as timer:
        for images, _ in loader:
            recorder.run(precision.batch(images))
    return num_images / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compression", default=None, help="Default: kdpipe extract's default.")
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(bare_forward_rate(args.bare[0], int(args.bare[1]), args.batch_size))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = teacher_checkpoint(Path(tmp))
        bare = float(
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--bare",
                    checkpoint,
                    str(args.num_images),
                    "--batch-size",
                    str(args.batch_size),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[-1]
        )
        codec = ["--compression", args.compression] if args.compression else []
        flags = ["--batch-size", str(args.batch_size), *codec]
        split = extract_split(Path(tmp) / "store", checkpoint, args.num_images, flags=flags)
    rate = split["images_per_second"]
    print(
        f"{TEACHER}, every tap + logits, batch {args.batch_size}, {split['num_samples']} images, "
        f"{split['raw_bytes'] / split['num_samples'] / 2**20:.2f} MiB/img float16, "
        f"stored/raw {split['stored_over_raw']}"
    )
    print(f"bare forward {bare:.1f} img/s; kdpipe extract {rate:.1f} img/s")
    print(f"P2 extract / bare forward: {rate / bare:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
