"""P12: mixed precision on the CPU: extract and distill throughput at float32 and at bf16, and how far bf16's cached
targets lie from float32's.

Measured in one run on the workload (a few thousand of its images): `kdpipe extract` of every tap and the logits, and
one `kdpipe distill` epoch from that store (targets in RAM), at float32 and bf16, each channels-first and
channels-last (oneDNN's bf16 convolutions want channels-last). Then, per cached array, the bf16 stores' difference
from the float32 store's: max |a - b| / max |a| and mean |a - b| / mean |a| over every value. The last line gives
the bf16 channels-last / float32 throughput ratios and the largest max relative difference.

    python benchmarks/p12_amp.py [--num-images 3000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from p1_cache_speedup import distill_epoch
from workload import STUDENT, TEACHER, extract_split, speed_flags, teacher_checkpoint

REFERENCE = "fp32"
SETTINGS = {"fp32": ("off", False), "fp32+cl": ("off", True), "bf16": ("bf16", False), "bf16+cl": ("bf16", True)}
ROWS_PER_READ = 256  # rows compared at a time: a whole float32 tap of 10k images would not fit in RAM


def target_difference(reference: Path, other: Path) -> dict[str, dict[str, float]]:
    """Per array of the train split (every tap, the logits): max and mean relative difference of `other`'s cached
    values from `reference`'s, read a few rows at a time."""
    from cache.schema import FEATURES, STORE_NAME
    from cache.store import FeatureStore

    parts = [FeatureStore.open(s / STORE_NAME).split("train") for s in (reference, other)]
    arrays = [f"{FEATURES}/{t}" for t in parts[0].tap_names] + ["logits"]
    differences = {}
    for array in arrays:
        top = top_difference = total = total_difference = 0.0
        for start in range(0, parts[0].num_samples, ROWS_PER_READ):
            rows = np.arange(start, min(start + ROWS_PER_READ, parts[0].num_samples))
            a, b = (p.read(array, rows).astype(np.float64) for p in parts)
            difference = np.abs(a - b)
            top, top_difference = max(top, np.abs(a).max()), max(top_difference, difference.max())
            total, total_difference = total + np.abs(a).sum(), total_difference + difference.sum()
        differences[array] = {
            "max_relative": top_difference / top if top else 0.0,
            "mean_relative": total_difference / total if total else 0.0,
        }
    return differences


def amp_comparison(
    folder: Path, checkpoint: str, num_images: int, settings: dict[str, tuple[str, bool]], device: str = "cpu"
) -> dict:
    """Extract and distill images/s at each of `settings` (name: (amp, channels_last)), and every bf16/fp16 store's
    target difference from the first setting's (float32) store."""
    rates, stores = {}, {}
    for name, (amp, channels_last) in settings.items():
        flags = speed_flags(amp, channels_last)
        stores[name] = folder / f"store-{name}"
        extracted = extract_split(stores[name], checkpoint, num_images, device=device, flags=flags)
        distilled = distill_epoch(stores[name], folder / f"distill-{name}", device, flags)
        rates[name] = {
            "extract_images_per_second": extracted["images_per_second"],
            "distill_images_per_second": distilled["images_per_second"],
        }
    reference = next(iter(settings))
    differences = {
        name: target_difference(stores[reference], stores[name]) for name, (amp, _) in settings.items() if amp != "off"
    }
    return {"rates": rates, "differences": differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = amp_comparison(tmp, teacher_checkpoint(tmp), args.num_images, SETTINGS)
    rates, differences = found["rates"], found["differences"]
    print(f"{TEACHER} (every tap + logits) -> {STUDENT}, {args.num_images} images, CPU")
    print(f"{'setting':10s} {'extract img/s':>14s} {'distill img/s':>14s}")
    for name, rate in rates.items():
        print(f"{name:10s} {rate['extract_images_per_second']:>14.1f} {rate['distill_images_per_second']:>14.1f}")
    for name, arrays in differences.items():
        print(f"{name} against {REFERENCE}: {'array':22s} {'max rel':>9s} {'mean rel':>9s}")
        for array, d in arrays.items():
            print(f"{'':>{len(name) + 9}}  {array:22s} {d['max_relative']:>9.4f} {d['mean_relative']:>9.4f}")
    fast, slow = rates["bf16+cl"], rates[REFERENCE]
    worst = max(d["max_relative"] for d in differences["bf16+cl"].values())
    print(
        f"P12 bf16 channels-last / float32: extract "
        f"{fast['extract_images_per_second'] / slow['extract_images_per_second']:.2f}x, distill "
        f"{fast['distill_images_per_second'] / slow['distill_images_per_second']:.2f}x; "
        f"targets max relative difference {worst:.4f}"
    )


if __name__ == "__main__":
    main()
