"""P14: the two-pass route for a large dataset against one pass, on a generated 224-px JPEG ImageFolder, in one run.

Both routes run the real CLI (`kdpipe`, each stage its own process, as a user runs them) with a timm teacher of
random weights on 2,000 train + 500 val images of the 10 digits (`jpeg_folder.py`):

- two passes: `extract --max-samples M` (every tap of a class-stratified sample) -> `score` -> `extract --layers
  picked:SAMPLE` (only the picked taps, every image) -> `distill` (1 epoch, the picks the store records) -> `probe`;
- one pass: `extract` (every tap of every image) -> `score` -> `distill` -> `probe`.

Where both scores pick the same taps, distill and probe do the same work on either store (the same taps, images and
student) and run once, on the two-pass store; where the picks differ they run on each. Store bytes are extract.json's
(float16 raw, and stored after compression). The teacher's residual blocks start from timm's init with the last
BatchNorm of each block at weight 1 (`zero_init_last=False`): timm's default zeroes it, which makes every block an
identity at init and gives a block's taps the Q of the one before.

    python benchmarks/p14_two_pass.py [--per-class 200 50] [--input-size 224] [--sample 500] [--teacher timm:resnet18]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from jpeg_folder import write_digit_folder
from pipeline.layout import EXTRACT_SUMMARY, SCORES
from workload import Timer, kdpipe

JPEG_QUALITY = 90


def teacher_checkpoint(folder: Path, name: str) -> str:
    """Random weights for `name` (10 classes) with non-zero last BatchNorms, saved as kdpipe saves a teacher."""
    import torch

    from pipeline.engine.checkpoints import save_checkpoint
    from pipeline.models.spec import ModelSpec
    from pipeline.models.zoo import create_model

    torch.manual_seed(0)
    path = folder / "teacher.safetensors"
    model = create_model(name, 10, model_kwargs={"zero_init_last": False})
    save_checkpoint(model, path, ModelSpec(name, 10))
    return str(path)


def timed(*args: str) -> float:
    """Wall seconds of one `kdpipe` command, its process start included."""
    with Timer() as timer:
        kdpipe(*args)
    return timer.seconds


def store_bytes(folder: Path) -> tuple[int, int]:
    """(raw, stored) bytes of the train split of the store in extract folder `folder`."""
    split = json.loads((folder / EXTRACT_SUMMARY).read_text())["splits"]["train"]
    return split["raw_bytes"], split["stored_bytes"]


def picks(folder: Path) -> list[str]:
    return json.loads((folder / SCORES).read_text())["selected"]


def downstream(store: Path, out: Path, student: str, batch_size: int) -> dict[str, float]:
    """Seconds of `distill` (1 epoch) and `probe` on `store`."""
    distill = ("distill", str(store), "--student", student, "--epochs", "1", "--batch-size", str(batch_size))
    return {
        "distill": timed(*distill, "--out", str(out), "--device", "cpu"),
        "probe": timed("probe", str(out), "--device", "cpu"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs=2, default=(200, 50), metavar=("TRAIN", "VAL"))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--sample", type=int, default=500, help="Pass 1's --max-samples.")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--teacher", default="timm:resnet18")
    parser.add_argument("--student", default="timm:lcnet_050")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    size = args.input_size
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = tmp / "images"
        jpeg_bytes = write_digit_folder(
            images, {"train": args.per_class[0], "val": args.per_class[1]}, ((size, size), (size, size)), JPEG_QUALITY
        )
        num_train = 10 * args.per_class[0]
        common = [
            *("--teacher", args.teacher, "--checkpoint", teacher_checkpoint(tmp, args.teacher)),
            *("--dataset", "imagefolder", "--data-root", str(images), "--input-size", str(size)),
            *("--batch-size", str(args.batch_size), "--device", "cpu"),
        ]
        sample, picked, whole = tmp / "sample", tmp / "picked", tmp / "whole"
        two = {
            "extract sample": timed("extract", *common, "--max-samples", str(args.sample), "--out", str(sample)),
            "score sample": timed("score", str(sample), "--top-k", str(args.top_k), "--no-plot"),
            "extract picks": timed("extract", *common, "--layers", f"picked:{sample}", "--out", str(picked)),
        }
        caching = {"two": sum(two.values())}
        two |= downstream(picked, tmp / "run-two", args.student, args.batch_size)
        one = {
            "extract all": timed("extract", *common, "--out", str(whole)),
            "score all": timed("score", str(whole), "--top-k", str(args.top_k), "--no-plot"),
        }
        caching["one"] = sum(one.values())
        same_picks = picks(whole) == picks(sample)
        if same_picks:
            one |= {stage: two[stage] for stage in ("distill", "probe")}
        else:
            one |= downstream(whole, tmp / "run-one", args.student, args.batch_size)
        sizes = {"sample": store_bytes(sample), "picked": store_bytes(picked), "whole": store_bytes(whole)}
        picked_taps, whole_taps = picks(sample), picks(whole)

    gib = 2**30
    print(
        f"{num_train} train + {10 * args.per_class[1]} val JPEGs of {size} px (quality {JPEG_QUALITY}, "
        f"{jpeg_bytes / 2**20:.0f} MiB), teacher {args.teacher} (random weights), student {args.student}, "
        f"batch {args.batch_size}, sample {args.sample}"
    )
    print(f"two-pass picks (from the sample): {', '.join(picked_taps)}")
    print(f"one-pass picks (from every image): {', '.join(whole_taps)}{'' if same_picks else '  (differ)'}")
    for label, (raw, stored) in (
        (f"one pass, every tap, {num_train} images", sizes["whole"]),
        (f"pass 1, every tap, {args.sample} images", sizes["sample"]),
        (f"pass 2, {len(picked_taps)} picked taps, {num_train} images", sizes["picked"]),
    ):
        print(f"  {label:42s} raw {raw / gib:6.2f} GiB  stored {stored / gib:6.2f} GiB  ({stored / raw:.2f})")
    for route, stages in (("two passes", two), ("one pass", one)):
        listed = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stages.items())
        print(f"{route}: {listed}; total {sum(stages.values()):.0f} s")
    print(f"distill and probe: {'the same picks, run once and counted in both' if same_picks else 'run on each store'}")
    kept = sizes["whole"][1] / sizes["picked"][1]
    both = sizes["whole"][1] / (sizes["picked"][1] + sizes["sample"][1])
    print(f"stored bytes one pass / two passes: {kept:.2f}x the kept store, {both:.2f}x with the sample store")
    print(f"time one pass / two passes: caching (extract + score) {caching['one'] / caching['two']:.2f}x")
    total = sum(one.values()) / sum(two.values())
    print(f"P14 one pass / two passes: stored bytes {kept:.2f}x, total time {total:.2f}x")


if __name__ == "__main__":
    main()
