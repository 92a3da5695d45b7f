"""kdpipe: offline two-stage feature knowledge distillation (Cooper et al. 2025).

The stages as a Python API, each taking its config (the same options as the command line, with the same defaults
and checks):

    from pipeline import DistillConfig, ProbeConfig, distill, probe
    distill(DistillConfig(store="runs/digits/extract", student="resnet8", out="runs/r8"))
    print(probe(ProbeConfig(run="runs/r8"))["test_top1"])
"""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"

# `kdpipe extract` shares the cores between the teacher and a background writer; OpenMP's spinning waits stall the
# teacher's parallel regions whenever the writer runs, and passive waiting measured +13 % extraction throughput on
# 2 cores (benchmarks/p2_extract_overhead.py). OpenMP reads the policy once, when torch loads it, so the command
# line sets it here, before the first torch import.
_command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)  # the group takes flags only
if Path(sys.argv[0]).name == "kdpipe" and _command == "extract":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import (  # noqa: E402
    DistillConfig,
    ExtractConfig,
    ProbeConfig,
    ReportConfig,
    ScoreConfig,
    TeachConfig,
)
from .distill import distill  # noqa: E402
from .extract import extract  # noqa: E402
from .models import create_model, list_models, load_teacher  # noqa: E402
from .probe import load_classifier, probe  # noqa: E402
from .report import report  # noqa: E402
from .score import score  # noqa: E402
from .teach import teach  # noqa: E402

__all__ = [
    "DistillConfig",
    "ExtractConfig",
    "ProbeConfig",
    "ReportConfig",
    "ScoreConfig",
    "TeachConfig",
    "create_model",
    "distill",
    "extract",
    "list_models",
    "load_classifier",
    "load_teacher",
    "probe",
    "report",
    "score",
    "teach",
]
