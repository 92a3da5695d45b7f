"""kdpipe: offline two-stage feature knowledge distillation (Cooper et al. 2025).

The stages as a Python API, each taking its config (the same options as the command line, with the same defaults
and checks):

    from pipeline import DistillConfig, ProbeConfig, distill, probe
    distill(DistillConfig(store="runs/digits/extract", student="resnet8", out="runs/r8"))
    print(probe(ProbeConfig(run="runs/r8"))["test_top1"])
"""

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from .version import __version__  # noqa: F401 (the package's version, re-exported)

# `kdpipe extract` shares the cores between the teacher and a background writer; OpenMP's spinning waits stall the
# teacher's parallel regions whenever the writer runs, and passive waiting measured +13 % extraction throughput on
# 2 cores (benchmarks/p2_extract_overhead.py). OpenMP reads the policy once, when torch loads it, so the command
# line sets it here, before the first torch import.
_command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)  # the group takes flags only
if Path(sys.argv[0]).name == "kdpipe" and _command == "extract":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The API is imported on first use (PEP 562), not with the package: the stages import torch, which takes seconds,
# and `kdpipe --help` needs none of them. Each name maps to the module that defines it.
_STAGES = ("distill", "extract", "probe", "report", "score", "teach")  # each a function of its own module's name
_API = {
    **dict.fromkeys(
        ["DistillConfig", "ExtractConfig", "ProbeConfig", "ReportConfig", "ScoreConfig", "TeachConfig"], "config"
    ),
    **dict.fromkeys(["create_model", "list_models", "load_teacher"], "models.zoo"),
    "load_classifier": "stages.probe",
    **{stage: f"stages.{stage}" for stage in _STAGES},
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
