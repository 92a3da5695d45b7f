"""P6: wall time of the full digits comparison (`configs/digits-report.yaml`), label budget sweep included, against
its 30-minute budget.

Measured in one run from nothing: the demo's teacher, store and scores are built first (timed apart), then
`kdpipe report` runs every method over every seed at every label fraction (the main table's runs and the sweep's).
Target: report time / 1,800 s <= 1 on 2 cores. The budget leaves room for one more method costing 2-3 kd runs.

    python benchmarks/p6_report_time.py [--keep DIR]   # --keep: build and report in DIR and keep them there
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

from pipeline.layout import REPORT_SUMMARY, TEACHER_WEIGHTS
from workload import Timer, kdpipe

CONFIG = str(Path(__file__).parents[1] / "configs" / "digits-report.yaml")
DEMO_CONFIG = str(Path(__file__).parents[1] / "configs" / "digits.yaml")
BUDGET_SECONDS = 30 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Build and report in this folder and keep it (for README figures).")
    args = parser.parse_args()
    folder = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()
    with folder as tmp:
        tmp = Path(tmp)
        with Timer() as setup:
            kdpipe("teach", "--config", DEMO_CONFIG, "--out", str(tmp / "teacher"))
            checkpoint = str(tmp / "teacher" / TEACHER_WEIGHTS)
            kdpipe("extract", "--config", DEMO_CONFIG, "--checkpoint", checkpoint, "--out", str(tmp / "extract"))
            kdpipe("score", "--config", DEMO_CONFIG, str(tmp / "extract"))
        with Timer() as report:
            kdpipe("report", "--config", CONFIG, "--store", str(tmp / "extract"), "--out", str(tmp / "report"))
        summary = json.loads((tmp / "report" / REPORT_SUMMARY).read_text())
    main_runs = len(summary["runs"])
    sweep = summary.get("sweep")
    # The sweep's runs at the main label fraction are the main runs, counted once.
    more = [r for r in sweep["runs"] if r["label_fraction"] != sweep["main_label_fraction"]] if sweep else []
    runs = main_runs + len(more)
    fractions = f" at label fractions {', '.join(map(str, sweep['label_fractions']))}" if sweep else ""
    print(f"teacher, store and scores: {setup.seconds:.0f} s")
    per_run = report.seconds / runs
    print(f"report: {runs} runs ({main_runs} main){fractions} in {report.seconds:.0f} s, {per_run:.1f} s a run")
    print(f"report time / 30-minute budget: {report.seconds / BUDGET_SECONDS:.2f}")


if __name__ == "__main__":
    main()
