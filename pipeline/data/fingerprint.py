"""What a dataset fingerprint covers: the sample content of one split, hashed by one of three schemes.

- `array`: in-memory datasets (digits, CIFAR, synthetic): every byte of the uint8 image array.
- `files`: image folders: every file's path (relative to the split's folder), size and content.
- `sampled`: image folders: every file's path, size and modification time (ns), and the content of `SAMPLED_FILES`
  evenly spaced files.

`--fingerprint auto` (the default) takes `array` for in-memory data, `files` for a folder of at most
`SMALL_TREE_FILES` files and `SMALL_TREE_BYTES` in all, `sampled` beyond; `--fingerprint full` takes `files` for
every folder. A store records the scheme with the fingerprint, and later stages recompute that scheme.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:  # the command line's options read this module's constants, and need no torch
    import torch

FINGERPRINT_MODES = ("auto", "full")
FULL_SCHEMES = ("array", "files")  # the schemes that hash every sample's content
SMALL_TREE_FILES = 2_000
SMALL_TREE_BYTES = 256 * 2**20
SAMPLED_FILES = 1_024
READ_THREADS = 8
READ_CHUNK = 1_024  # files handed to the reading threads at a time


class ArrayContent:
    """Images held in memory as one uint8 tensor: hashed whole, whatever the mode."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def scheme(self, mode: str) -> str:
        return "array"

    def update(self, digest, scheme: str) -> None:
        _check_scheme(scheme, ("array",))
        digest.update(np.ascontiguousarray(self.images.numpy()))


class FileContent:
    """An image folder's files (`paths`, in sample order) under the split's folder `root`."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.root, self.paths = Path(root), list(paths)

    @cached_property
    def stats(self) -> list[os.stat_result]:
        return [_stat(p) for p in self.paths]

    def scheme(self, mode: str) -> str:
        if mode == "full":
            return "files"
        small = len(self.paths) <= SMALL_TREE_FILES and sum(s.st_size for s in self.stats) <= SMALL_TREE_BYTES
        return "files" if small else "sampled"

    def update(self, digest, scheme: str) -> None:
        _check_scheme(scheme, ("files", "sampled"))
        read = np.arange(len(self.paths)) if scheme == "files" else sampled_files(len(self.paths))
        contents = dict(zip(read.tolist(), _file_digests([self.paths[i] for i in read]), strict=True))
        for i, (path, stat) in enumerate(zip(self.paths, self.stats, strict=True)):
            fields = [Path(path).relative_to(self.root).as_posix(), stat.st_size]
            if scheme == "sampled":
                fields.append(stat.st_mtime_ns)
            digest.update(json.dumps(fields).encode())
            digest.update(contents.get(i, b""))


def sampled_files(count: int) -> np.ndarray:
    """Positions of the files whose content the `sampled` scheme hashes: `SAMPLED_FILES` evenly spaced ones, the
    first and last included."""
    return np.unique(np.linspace(0, count - 1, num=min(SAMPLED_FILES, count), dtype=np.int64))


def _check_scheme(scheme: str, known: tuple[str, ...]) -> None:
    if scheme not in known:
        raise UserError(f"fingerprint scheme {scheme!r} does not apply to this dataset (it has {', '.join(known)})")


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror}") from err


def _file_digests(paths: list[str]) -> Iterator[bytes]:
    """sha256 of each file's content, in order, read by a few threads a chunk at a time."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(paths), READ_CHUNK):
            yield from pool.map(_file_digest, paths[start : start + READ_CHUNK])


def _file_digest(path: str) -> bytes:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror}") from err
    return digest.digest()
