"""The CUDA paths of kdpipe in one run on one GPU (issue 17), with the figures the CPU benchmarks cannot give.

On the workload (resnet18_cifar teacher -> resnet8 student, 10k synthetic 32x32 images), in order:

1. P2 at float32: the bare teacher forward against `kdpipe extract` of every tap and the logits;
2. P2 again under --amp (bf16 by default) with --channels-last;
3. the AMP store's cached targets against the float32 store's, per array (P12's max and mean relative difference);
4. P1 under --amp and --channels-last: a distill epoch reading the AMP store against one with the online teacher,
   and the ideal speed-up from in-memory batches;
5. `kdpipe score` of the three distilled taps of the AMP store on the GPU, and on the CPU: Q must agree to 1e-6.

Images/s and ratios are printed as each step ends, and all figures are written to a JSON file (its path printed)
for benchmarks/README.md. `--dry` runs the same steps on the CPU at 256 images (bf16, as the CPU allows), so that
CI keeps the script working; without CUDA and without --dry it says so in one line and exits with status 1.

    benchmarks/gpu_check.sh [--dry] [--amp bf16|fp16] [--num-images N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from p1_cache_speedup import IDEAL_BATCHES, cache_speedup
from p2_extract_overhead import bare_forward_rate
from p12_amp import target_difference
from pipeline.layout import SCORES
from workload import STUDENT, TEACHER, TEACHER_TAPS, Timer, extract_split, kdpipe, speed_flags, teacher_checkpoint

BATCH = 64  # extraction's default batch
DRY_IMAGES = 256
DRY_BATCHES = 2  # in-memory batches timed for P1's ideal with --dry


def extract_against_bare(folder: Path, checkpoint: str, num_images: int, device: str, amp: str) -> dict:
    """P2 at one precision (channels-last with AMP): bare forward and `kdpipe extract` images/s, and their ratio."""
    channels_last = amp != "off"
    bare = bare_forward_rate(checkpoint, num_images, BATCH, device, amp, channels_last)
    flags = ["--batch-size", str(BATCH), *speed_flags(amp, channels_last)]
    split = extract_split(folder, checkpoint, num_images, device, flags)
    rate = split["images_per_second"]
    return {
        "amp": amp,
        "channels_last": channels_last,
        "bare_forward_images_per_second": round(bare, 1),
        "extract_images_per_second": rate,
        "extract_over_bare": round(rate / bare, 3),
        "stored_over_raw": split["stored_over_raw"],
    }


def score_on(store: Path, device: str) -> dict:
    """`kdpipe score` of the distilled taps on `device`: seconds and each tap's Q."""
    with Timer() as timer:
        kdpipe("score", str(store), "--layers", ",".join(TEACHER_TAPS), "--top-k", "3", "--no-plot", "--device", device)
    scores = json.loads((store / SCORES).read_text())
    return {"seconds": round(timer.seconds, 2), "Q": {t["name"]: t["Q"] for t in scores["taps"]}}


def score_check(store: Path, device: str) -> dict:
    """score on `device` and, on a GPU, on the CPU too: the Gram product's two routes must agree to 1e-6 in Q."""
    here = score_on(store, device)
    if device == "cpu":
        return {"device": "cpu", "seconds": here["seconds"]}
    cpu = score_on(store, "cpu")
    differ = max(abs(here["Q"][k] - q) / abs(q) for k, q in cpu["Q"].items())
    return {
        "device": device,
        "seconds": here["seconds"],
        "cpu_seconds": cpu["seconds"],
        "largest_relative_q_difference": float(f"{differ:.2e}"),
    }


def step(title: str, figures: dict) -> dict:
    print(f"{title}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help=f"The same steps on the CPU at {DRY_IMAGES} images.")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--num-images", type=int, default=None, help=f"Default 10000 ({DRY_IMAGES} with --dry).")
    parser.add_argument("--json", default="gpu_check.json", help="Where the figures are written.")
    args = parser.parse_args()
    if not args.dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device on this machine; run it where there is one, or pass --dry for the CPU")
    if args.dry and args.amp == "fp16":
        sys.exit("gpu_check: --dry runs on the CPU, where kdpipe refuses fp16; use --amp bf16")
    device = "cpu" if args.dry else "cuda"
    num_images = args.num_images or (DRY_IMAGES if args.dry else 10_000)
    ideal_batches = DRY_BATCHES if args.dry else IDEAL_BATCHES
    where = "CPU (dry)" if args.dry else torch.cuda.get_device_name()
    print(f"{TEACHER} -> {STUDENT}, {num_images} synthetic images, --amp {args.amp}, on {where}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = teacher_checkpoint(tmp)
        figures = {"device": where, "num_images": num_images, "amp": args.amp}
        figures["p2_fp32"] = step("P2 fp32", extract_against_bare(tmp / "fp32", checkpoint, num_images, device, "off"))
        figures["p2_amp"] = step(
            f"P2 {args.amp}", extract_against_bare(tmp / "amp", checkpoint, num_images, device, args.amp)
        )
        figures["target_difference"] = target_difference(tmp / "fp32", tmp / "amp")
        worst = max(figures["target_difference"].items(), key=lambda item: item[1]["max_relative"])
        step(f"{args.amp} targets vs fp32", {"largest max relative difference": f"{worst[1]['max_relative']:.4f}"})
        figures["p1_amp"] = step(
            f"P1 {args.amp} channels-last",
            cache_speedup(tmp / "amp", checkpoint, tmp, device, args.amp, True, ideal_batches),
        )
        figures["score"] = step("score", score_check(tmp / "amp", device))
    figures["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {Path(args.json).resolve()} ({figures['seconds']:.0f} s)")
    print(
        f"GPU check: P1 {figures['p1_amp']['measured_over_ideal']:.2f} of the ideal cache speed-up; P2 extract / bare "
        f"forward {figures['p2_fp32']['extract_over_bare']:.2f} fp32, {figures['p2_amp']['extract_over_bare']:.2f} "
        f"{args.amp}; targets max relative difference {worst[1]['max_relative']:.4f} ({worst[0]})"
    )


if __name__ == "__main__":
    main()
