"""P6: wall time of the full digits comparison (`configs/digits-report.yaml`) against its 20-minute budget.

Measured in one run from nothing: the demo's teacher, store and scores are built first (timed apart), then
`kdpipe report` runs every method over every seed. Target: report time / 1,200 s <= 1 on 2 cores.

    python benchmarks/p6_report_time.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.layout import REPORT_SUMMARY, TEACHER_WEIGHTS
from workload import Timer, kdpipe

CONFIG = str(Path(__file__).parents[1] / "configs" / "digits-report.yaml")
DEMO_CONFIG = str(Path(__file__).parents[1] / "configs" / "digits.yaml")
BUDGET_SECONDS = 20 * 60


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Timer() as setup:
            kdpipe("teach", "--config", DEMO_CONFIG, "--out", str(tmp / "teacher"))
            checkpoint = str(tmp / "teacher" / TEACHER_WEIGHTS)
            kdpipe("extract", "--config", DEMO_CONFIG, "--checkpoint", checkpoint, "--out", str(tmp / "extract"))
            kdpipe("score", "--config", DEMO_CONFIG, str(tmp / "extract"))
        with Timer() as report:
            kdpipe("report", "--config", CONFIG, "--store", str(tmp / "extract"), "--out", str(tmp / "report"))
        summary = json.loads((tmp / "report" / REPORT_SUMMARY).read_text())
    runs = len(summary["runs"])
    print(f"teacher, store and scores: {setup.seconds:.0f} s; report: {runs} runs in {report.seconds:.0f} s")
    print(f"report time / 20-minute budget: {report.seconds / BUDGET_SECONDS:.2f}")


if __name__ == "__main__":
    main()
