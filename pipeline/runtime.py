"""Device choice, seeding and the small file outputs every stage shares (JSON summary, resolved args)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch; returns a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes via a temporary file so a reader never sees half a summary."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def write_args(path: Path, params: dict[str, Any]) -> None:
    """The resolved options of a run (config file merged with the command line), as timm's args.yaml."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
    path.write_text(yaml.safe_dump(plain, sort_keys=False))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-epoch metrics, one row each (timm's summary.csv)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
