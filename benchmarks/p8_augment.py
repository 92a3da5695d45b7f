"""P8: what a cache of augmented views buys on digits, against no augmentation and against the online teacher.

Digits, the resnet20 teacher of `configs/digits.yaml` -> a resnet8 student (widths 8/16/32, taps layer1.0, layer2.0,
layer3.0), method `feature` (feature MSE on the taps Q picks, then `kdpipe probe`), the digits-report recipe
(`configs/digits-report.yaml`: batch 32, AdamW + OneCycle at lr 0.05, wd 0.01), at label fractions 0.1 and 1.0
(the feature method distills on all 1,437 train images either way; the probe is fitted on the labelled ones), seeds
0, 1, 2, every variant the same number of optimizer steps:

    none     no augmentation: a plain store (`kdpipe extract`, one view)
    K=1      the K=8 store with `distill --views 1`: view 0 only, the plain image
    K=4      the K=8 store with `distill --views 4`: each epoch every image under one of views 0..3
    K=8      the K=8 store with `distill --views 8`
    online   the plain store with `distill --online-teacher --augment crop`: a fresh view every epoch, the teacher
             run on every batch

One store serves every K: `extract --views 8 --augment crop` (`crop`: pad 4, crop 32 at random, no flip, as digits
are not flip-invariant) draws view v of image i from a seed of (seed, i, v) alone and stores its crop box, so views
0..K-1 of the K=8 store are exactly the views a K-view store would hold, and `--views K` draws among those first K.
K=1 is view 0, the plain image, so it must reproduce `none`: the script checks that their student weights and
top-1 are identical in every run (a free correctness check of the views code) and says so after the table.

Time is seconds per 100 optimizer steps of training: each run's fastest epoch in distill_log.csv (an epoch is 44
steps of batch 32; the last one, cut short by the budget, left out) / 44 x 100, then the median over the variant's
runs at that budget (3 seeds x 2 fractions). The fastest epoch and medians because the machine is shared: other
jobs' bursts stretch single epochs 10-70x, while unloaded epochs of one run agree within a few per cent. `epoch 1
extra s` is the first epoch's time over the run's fastest (median over runs): the one-off read of the cached
targets into RAM (every view of them), plus noise. Process start-up and the probe are left out. The cached
variants' time is compared with online's (the cost the cache exists to avoid); top-1 is mean ± std over seeds, and
the gain over `none` is the mean ± std of the per-seed differences.

The feature method distills on all train images at either label fraction, so the 0.1 and 1.0 runs of a variant
and seed train the same student (the probe alone differs); the script runs both, as the CLI has no way to probe one
run under two label budgets, and their timings count as separate samples.

Built from nothing in a temp folder (or `--keep DIR`): teacher, the plain and the K=8 store (each extract timed,
each store's size on disk reported), scores.

Budget: 1,080 steps (25 epochs of the 1,437 images), 3x digits-report's 360, since augmentation usually needs
longer training to pay off (one seed in trial runs: at 360 steps K=8 and online lost 1.1 and 1.7 points against
none, at 1,080 only 0.8 and 0.3). Both budgets (`--steps 360,1080`) would take about 30 minutes on 2 idle cores
(each run also pays about 14 s of process start-up and probe); 1,080 alone keeps the script near 20.

    python benchmarks/p8_augment.py [--keep DIR] [--steps 1080] [--seeds 0,1,2]

With `--keep DIR` a second invocation reuses the teacher and every run an interrupted one finished (each run is
seeded, so it would be the same), and extracts the stores again to time them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from pipeline.layout import DISTILL_LOG, DISTILL_SUMMARY, PROBE_SUMMARY, STUDENT_WEIGHTS, TEACHER_WEIGHTS
from workload import Timer, kdpipe

CONFIG = str(Path(__file__).parents[1] / "configs" / "digits-report.yaml")
DEMO_CONFIG = str(Path(__file__).parents[1] / "configs" / "digits.yaml")
POLICY = "crop"
VIEWS = 8
FRACTIONS = (0.1, 1.0)
# (name, store, distill flags)
VARIANTS = (
    ("none", "plain", ()),
    ("K=1", "views", ("--views", "1")),
    ("K=4", "views", ("--views", "4")),
    ("K=8", "views", ("--views", "8")),
    ("online", "plain", ("--online-teacher", "--augment", POLICY)),
)


def store_bytes(folder: Path) -> int:
    """Bytes on disk of the store in `folder` (every file of features.zarr)."""
    return sum(f.stat().st_size for f in (folder / "features.zarr").rglob("*") if f.is_file())


def run(tmp: Path, stores: dict[str, Path], variant: str, steps: int, fraction: float, seed: int) -> dict:
    """One distill + probe; its top-1, training seconds per 100 steps and folder."""
    name, store, flags = next(v for v in VARIANTS if v[0] == variant)
    out = tmp / "runs" / f"steps-{steps}" / name.replace("=", "") / f"labels-{fraction:g}" / f"seed-{seed}"
    if (out / PROBE_SUMMARY).is_file():  # finished by an earlier, interrupted run of the script (--keep)
        return measured(out, steps)
    common = ("--config", CONFIG, "--method", "feature", "--steps", str(steps), "--seed", str(seed))
    kdpipe("distill", str(stores[store]), *common, "--label-fraction", str(fraction), "--out", str(out), *flags)
    kdpipe("probe", "--config", CONFIG, str(out))
    return measured(out, steps)


def measured(out: Path, steps: int) -> dict:
    """A finished run's top-1, seconds per 100 steps (its fastest full epoch), its first epoch's extra seconds, teacher
    taps and folder."""
    summary = json.loads((out / DISTILL_SUMMARY).read_text())
    assert summary["steps"] == steps, (out, summary["steps"])
    with open(out / DISTILL_LOG, newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    seconds = seconds[:-1] or seconds  # the last epoch is cut short
    epoch = min(seconds)
    return {
        "top1": json.loads((out / PROBE_SUMMARY).read_text())["test_top1"],
        "per_100": 100 * epoch / (summary["num_training_rows"] // summary["batch_size"]),
        "first_extra": seconds[0] - epoch,
        "taps": summary["teacher_taps"],
        "out": out,
    }


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' students hold identical tensors (the files' metadata names their stores, so it differs)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / STUDENT_WEIGHTS), load_file(b / STUDENT_WEIGHTS)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def checks(results: dict) -> tuple[list[bool], list[bool]]:
    """Per (budget, fraction, seed): K=1 gave the same student and top-1 as none. Per (budget, variant, seed): the
    student distilled at the second label fraction is the one distilled at the first."""
    identical = [
        r["top1"] == results[steps, "K=1", f, s]["top1"] and same_weights(r["out"], results[steps, "K=1", f, s]["out"])
        for (steps, variant, f, s), r in results.items()
        if variant == "none"
    ]
    by_fraction = [
        same_weights(r["out"], results[steps, variant, FRACTIONS[0], s]["out"])
        for (steps, variant, f, s), r in results.items()
        if f != FRACTIONS[0]
    ]
    return identical, by_fraction


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def signed(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def median_of(results: dict, steps: int, variant: str, key: str, seeds: list[int]) -> float:
    """The median of `key` over the variant's runs at `steps` (every fraction and seed)."""
    return statistics.median(results[steps, variant, f, s][key] for f in FRACTIONS for s in seeds)


def table(results: dict, budgets: list[int], seeds: list[int]) -> list[str]:
    head = ["steps", "variant", "s / 100 steps", "÷ online", "epoch 1 extra s"]
    for f in FRACTIONS:
        head += [f"top-1 % at {f:.0%} labels", "gain over none"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for steps in budgets:
        online = median_of(results, steps, "online", "per_100", seeds)
        for variant, _, _ in VARIANTS:
            per_100 = median_of(results, steps, variant, "per_100", seeds)
            extra = median_of(results, steps, variant, "first_extra", seeds)
            cells = [str(steps), variant, f"{per_100:.2f}", f"{per_100 / online:.2f}", f"{extra:.1f}"]
            for f in FRACTIONS:
                top1 = [results[steps, variant, f, s]["top1"] for s in seeds]
                base = [results[steps, "none", f, s]["top1"] for s in seeds]
                gains = [t - b for t, b in zip(top1, base, strict=True)]
                cells += [mean_std(top1), "—" if variant == "none" else signed(gains)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Build and run in this folder and keep it.")
    parser.add_argument("--steps", default="1080", help="Step budgets, comma-separated (default 1080).")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds, comma-separated (default 0,1,2).")
    args = parser.parse_args()
    budgets = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()
    with folder as tmp, Timer() as whole:
        tmp = Path(tmp)
        stores = {"plain": tmp / "plain", "views": tmp / f"views-{VIEWS}"}
        with Timer() as teach:
            if not (tmp / "teacher" / TEACHER_WEIGHTS).is_file():  # kept from an earlier run: training is seeded
                kdpipe("teach", "--config", DEMO_CONFIG, "--out", str(tmp / "teacher"))
        for store in stores.values():  # extracted again, so that their times are measured (the same bytes)
            shutil.rmtree(store, ignore_errors=True)
        extract = ("extract", "--config", DEMO_CONFIG, "--checkpoint", str(tmp / "teacher" / TEACHER_WEIGHTS))
        with Timer() as plain:
            kdpipe(*extract, "--out", str(stores["plain"]))
        with Timer() as views:
            kdpipe(*extract, "--out", str(stores["views"]), "--views", str(VIEWS), "--augment", POLICY)
        for store in stores.values():
            kdpipe("score", "--config", DEMO_CONFIG, str(store))
        sizes = {k: store_bytes(v) for k, v in stores.items()}
        results = {}
        # Interleaved (every variant of one seed and fraction in turn), so that load from elsewhere on the machine
        # falls on every variant alike.
        for steps in budgets:
            for seed in seeds:
                for fraction in FRACTIONS:
                    for variant, _, _ in VARIANTS:
                        results[steps, variant, fraction, seed] = run(tmp, stores, variant, steps, fraction, seed)
        identical, by_fraction = checks(results)
        taps = {tuple(r["taps"]) for r in results.values()}
        rows = [{"run": list(k), **r, "out": str(r["out"])} for k, r in results.items()]
        (tmp / "p8.json").write_text(json.dumps(rows, indent=1))
    mib = 2**20
    print(f"teacher {teach.seconds:.0f} s; the whole script {whole.seconds:.0f} s ({os.cpu_count()} cores)")
    print(
        f"extract: plain store {plain.seconds:.1f} s, {sizes['plain'] / mib:,.0f} MiB; K={VIEWS} store "
        f"({POLICY}) {views.seconds:.1f} s, {sizes['views'] / mib:,.0f} MiB "
        f"({views.seconds / plain.seconds:.1f}x the time, {sizes['views'] / sizes['plain']:.1f}x the size)"
    )
    print(f"teacher taps (Q's pick): {', '.join(' / '.join(t) for t in sorted(taps))}")
    print()
    print("\n".join(table(results, budgets, seeds)))
    print()
    check = "identical" if all(identical) else f"NOT identical in {identical.count(False)} of"
    print(f"K=1 against none (same seeds, fractions, budgets): student weights and top-1 {check} {len(identical)} runs")
    print(
        f"students distilled at label fraction {FRACTIONS[1]:g} and {FRACTIONS[0]:g} (same variant, seed, budget): "
        f"identical in {by_fraction.count(True)} of {len(by_fraction)}"
    )
    steps = budgets[-1]
    cached = median_of(results, steps, f"K={VIEWS}", "per_100", seeds)
    online = median_of(results, steps, "online", "per_100", seeds)
    print(f"cached K={VIEWS} time / online time per step ({steps} steps): {cached / online:.2f}")


if __name__ == "__main__":
    main()
