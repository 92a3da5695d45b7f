"""Device choice, seeding, progress bars and the small file outputs every stage shares (JSON, CSV, resolved args)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cache.location import is_remote, location, put_bytes

from ..errors import UserError, writing
from ..layout import args_file

if TYPE_CHECKING:
    from ..config import Config


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch; returns a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` whole or not at all: into `path.tmp`, synced to disk, then renamed over `path`, so a
    crash or a full disk leaves the previous file or none, never a truncated one a later run would trust (the sync
    makes a filesystem that reports a full disk late report it here). A write the filesystem refuses (full disk,
    read-only, no permission) is a UserError naming `path`; its temporary file is removed. On object storage the
    object is written whole by one PUT (`cache.location.put_bytes`), which is atomic already."""
    path = location(path)
    if is_remote(path):
        with writing(path):
            put_bytes(path, data)
        return
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_args(folder: str | Path, config: Config) -> None:
    """The resolved config of a run (`<command>_args.yaml`, as timm's args.yaml), written before the work starts,
    so an output folder that cannot be written fails the run at once."""
    write_config(args_file(folder, config.command), config)


def write_config(path: Path, config: Config) -> None:
    write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    logging.getLogger(__name__).debug("resolved config in %s", path)


def write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def write_png(path: Path, figure) -> None:
    """A matplotlib figure as PNG at 120 dpi."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    write_bytes(path, buffer.getvalue())


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


LOGGED_PROGRESS_SECONDS = 30.0  # off a terminal, a long loop's progress is one log line at most this often


class LoggedProgress(tqdm):
    """A tqdm bar for a log file: its status (count, rate, time left) as one INFO line of the `pipeline` logger at most
    every `LOGGED_PROGRESS_SECONDS` (a postfix change included), and once at the end, instead of redrawing a bar no
    file can show."""

    def __init__(self, iterable=None, **kwargs) -> None:
        self._logged_at, self._logged_n, self._closing = -math.inf, None, False
        kwargs.update(mininterval=LOGGED_PROGRESS_SECONDS, maxinterval=LOGGED_PROGRESS_SECONDS, file=io.StringIO())
        super().__init__(iterable, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        due = self._closing or now - self._logged_at >= LOGGED_PROGRESS_SECONDS
        # the empty bar drawn at the start says nothing, and a bar closed with leave=False passes msg ""
        if due and msg != "" and (self.n or self.total == 0):
            logging.getLogger("pipeline.progress").info("%s", msg or self.__str__())
            self._logged_at, self._logged_n = now, self.n
        return True

    def close(self) -> None:
        self._closing = self.n != self._logged_n  # the end, unless that very count was just logged
        super().close()


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr when it is a terminal; a `LoggedProgress` (a log line at a bounded rate) when it is not
    (a log file, CI); off when the `pipeline` logger is set above INFO (`kdpipe --quiet`)."""
    if logging.getLogger("pipeline").level > logging.INFO:
        return tqdm(iterable, disable=True, **kwargs)
    if not _is_terminal(kwargs.get("file")):
        return LoggedProgress(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def _is_terminal(file=None) -> bool:
    """Whether the bar's file (stderr unless given) is a terminal."""
    file = sys.stderr if file is None else file
    return file is not None and file.isatty()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-epoch metrics, one row each (timm's summary.csv)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, text.getvalue().encode())
