"""P2: extraction throughput against the bare teacher forward on the same batches (target >= 0.9).

Both sides run the teacher over the same images with the same taps recorded; extraction additionally converts
every tap to float16, checks it, compresses it and writes it through the background writer.

    python benchmarks/p2_extract_overhead.py [--num-images 10000] [--batch-size 64] [--compression zstd:1:shuffle]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Subset

from workload import DATASET, TEACHER, Timer, setup_threads, teacher_checkpoint


def bare_forward_rate(checkpoint: str, num_images: int, batch_size: int) -> float:
    """Images/s of the teacher forward alone, recording every tap, on the batches extraction sees."""
    from pipeline.datasets import load_split
    from pipeline.extract import load_teacher
    from pipeline.recipe import make_loader
    from pipeline.taps import TapRecorder, list_taps

    data = load_split(DATASET, "train")
    model = load_teacher(TEACHER, checkpoint, False, None, 10, 32).eval()
    taps = [t.name for t in list_taps(model, 32)]
    loader = make_loader(Subset(data, list(range(num_images))), batch_size)
    with torch.no_grad(), TapRecorder(model, taps) as recorder, Timer() as timer:
        for images, _ in loader:
            recorder.run(images)
    return num_images / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compression", default="zstd:1:shuffle")
    args = parser.parse_args()
    setup_threads()
    from pipeline.extract import extract

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = teacher_checkpoint(Path(tmp))
        bare = bare_forward_rate(checkpoint, args.num_images, args.batch_size)
        summary = extract(TEACHER, DATASET, str(Path(tmp) / "store"), checkpoint=checkpoint,
                          max_samples=args.num_images if args.num_images < 10_000 else None,
                          batch_size=args.batch_size, device="cpu", compression=args.compression)
    split = summary["splits"]["train"]
    rate = split["images_per_second"]
    print(f"teacher {TEACHER}, all {len(summary.get('taps', [])) or 10} taps + logits, batch {args.batch_size}, "
          f"{args.num_images} images, compression {args.compression}")
    print(f"bare forward: {bare:.1f} img/s; extract: {rate:.1f} img/s; "
          f"{split['raw_bytes'] / split['num_samples'] / 2**20:.2f} MiB/img raw, stored/raw {split['stored_over_raw']}")
    print(f"P2 extraction / bare forward: {rate / bare:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
