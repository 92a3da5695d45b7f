"""P2: `kdpipe extract` throughput against the bare teacher forward on the same batches (target >= 0.9).

Each side runs in its own process. The bare side runs the teacher over the images recording every tap and
discards them; `kdpipe extract` (the real CLI) also converts every tap to float16, checks it, compresses it and
writes it through the background writer.

    python benchmarks/p2_extract_overhead.py [--num-images 10000] [--batch-size 64] [--compression C]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.layout import EXTRACT_SUMMARY
from workload import DATASET, TEACHER, Timer, kdpipe, setup_threads, teacher_checkpoint


def teacher_forward(checkpoint: str, num_images: int, batch_size: int):
    """The teacher recording every tap (a TapRecorder to enter) and the loader of the batches extraction sees."""
    from torch.utils.data import Subset

    from pipeline.datasets import load_split
    from pipeline.models import load_teacher
    from pipeline.recipe import make_loader
    from pipeline.taps import TapRecorder, list_taps

    setup_threads()
    data = load_split(DATASET, "train")
    model = load_teacher(TEACHER, checkpoint, False, None, 10, 32)[0].eval()
    taps = [t.name for t in list_taps(model, 32)]
    return TapRecorder(model, taps), make_loader(Subset(data, list(range(num_images))), batch_size)


def bare_forward_rate(checkpoint: str, num_images: int, batch_size: int) -> float:
    """Images/s of the teacher forward alone, recording every tap, on the batches extraction sees."""
    import torch

    recorder, loader = teacher_forward(checkpoint, num_images, batch_size)
    with torch.no_grad(), recorder, Timer() as timer:
        for images, _ in loader:
            recorder.run(images)
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
        command = [
            "extract",
            "--teacher",
            TEACHER,
            "--dataset",
            DATASET,
            "--checkpoint",
            checkpoint,
            "--batch-size",
            str(args.batch_size),
            "--device",
            "cpu",
            "--out",
            str(Path(tmp) / "store"),
        ]
        if args.num_images < 10_000:
            command += ["--max-samples", str(args.num_images)]
        if args.compression:
            command += ["--compression", args.compression]
        kdpipe(*command)
        summary = json.loads((Path(tmp) / "store" / EXTRACT_SUMMARY).read_text())
    split = summary["splits"]["train"]
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
