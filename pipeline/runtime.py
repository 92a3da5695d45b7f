"""Device choice, seeding, progress bars and the small file outputs every stage shares (JSON, CSV, resolved args)."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from .errors import UserError
from .layout import args_file

if TYPE_CHECKING:
    from .config import Config


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


def write_args(folder: str | Path, config: Config) -> None:
    """The resolved config of a run (`<command>_args.yaml`, as timm's args.yaml), written before the work starts."""
    write_config(args_file(folder, config.command), config)


def write_config(path: Path, config: Config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    logging.getLogger(__name__).debug("resolved config in %s", path)


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any]:
    """(dotted path, old value, new value) of the first field where two records differ ("" for the whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return prefix.rstrip("."), old, new


def short(value: Any) -> str:
    """A value as JSON, cut to 40 characters for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr, off when stderr is not a terminal (log files, CI) or the `pipeline` logger is set above
    INFO (`kdpipe --quiet`)."""
    quiet = logging.getLogger("pipeline").level > logging.INFO
    return tqdm(iterable, disable=True if quiet else None, **kwargs)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-epoch metrics, one row each (timm's summary.csv)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
