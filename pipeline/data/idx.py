"""MNIST-style IDX files (MNIST, Fashion-MNIST), gzip or not, read by torchvision's IDX reader.

A split is two files, `<prefix>-images-idx3-ubyte` and `<prefix>-labels-idx1-ubyte` (prefix `train` or `t10k`),
each optionally gzipped (`.gz`) and, as some mirrors name them, with a dot before `idx` (`train-images.idx3-ubyte`).
They are looked for in the layouts users have, in this order: the four files in the data root itself (what Debian's
`dataset-fashion-mnist` and most mirrors hold), then torchvision's `<root>/<Class>/raw/` (`FashionMNIST/raw`,
`MNIST/raw`). torchvision parses the files (`torchvision.datasets.mnist.read_image_file` / `read_label_file`); the
header is checked here first, so that a foreign, truncated or mismatched file is named in one line instead of
torchvision's bare assertion or a tensor reshape error.
"""

from __future__ import annotations

import gzip
import math
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from ..errors import UserError, first_line

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes; 3 dims (N, H, W) and 1 dim (N)
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class IdxSource:
    """One IDX dataset: its name, torchvision's class (download and `<root>/<Class>/raw` layout), its class names,
    where it lies without `--data-root` (None: nowhere) and how a user gets it."""

    name: str
    tv_class: type
    default_root: str | None
    how_to_get: str

    @property
    def raw_folder(self) -> str:
        return f"{self.tv_class.__name__}/raw"

    @property
    def classes(self) -> list[str]:
        return list(self.tv_class.classes)


def read_idx_split(source: IdxSource, split: str, root: str | None, download: bool) -> tuple[torch.Tensor, np.ndarray]:
    """(uint8 images (N, H, W), int64 labels (N,)) of one split, each file checked and named when it is wrong."""
    root = root or source.default_root
    if root is None:
        raise UserError(f"dataset {source.name!r} needs --data-root: {_layouts(source)}; {source.how_to_get}")
    if download:
        _download(source, root)
    folder = find_folder(source, Path(root), split)
    images_file = idx_file(folder, split, "images", 3)
    labels_file = idx_file(folder, split, "labels", 1)
    images = _read(images_file, IMAGES_MAGIC, read_image_file)
    labels = _read(labels_file, LABELS_MAGIC, read_label_file).numpy()
    if len(images) != len(labels):
        raise UserError(
            f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels; "
            "the two files must come from the same split"
        )
    num_classes = len(source.classes)
    bad = np.flatnonzero(labels >= num_classes)
    if len(bad):
        raise UserError(
            f"{labels_file}: label {labels[bad[0]]} at position {bad[0]} is out of range for {source.name}'s "
            f"{num_classes} classes (0..{num_classes - 1}); the file is damaged or another dataset's"
        )
    return images, labels


def find_folder(source: IdxSource, root: Path, split: str) -> Path:
    """The first layout under `root` that holds the split's image file (gzip or not)."""
    if not root.is_dir():
        raise UserError(f"data root not found: {root} ({_layouts(source)}; {source.how_to_get})")
    for folder in (root, root / source.raw_folder):
        if any(folder.glob(f"{SPLIT_PREFIX[split]}-images[-.]idx3-ubyte*")):
            return folder
    raise UserError(f"{root} holds no {source.name} {split} images ({_layouts(source)}; {source.how_to_get})")


def idx_file(folder: Path, split: str, kind: str, dims: int) -> Path:
    """The split's `kind` file (images or labels) in `folder`, under any of its usual names."""
    stem = f"{SPLIT_PREFIX[split]}-{kind}"
    names = [f"{stem}{sep}idx{dims}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise UserError(
        f"{folder / names[1]} is missing (or {names[0]}); the {split} split needs it beside its images "
        "(copy it from the same download)"
    )


def _read(path: Path, magic: int, reader) -> torch.Tensor:
    """The tensor an IDX file holds, parsed by torchvision after its header and size were checked here."""
    data = _content(path)
    kind, other = ("image", "label") if magic == IMAGES_MAGIC else ("label", "image")
    if len(data) < 4:
        size = "empty" if not data else f"{len(data)} bytes long"
        raise UserError(f"{path} is {size}, not an IDX {kind} file; get the file again")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        whose = f", that of an IDX {other} file" if found in (IMAGES_MAGIC, LABELS_MAGIC) else ""
        raise UserError(
            f"{path} is not an IDX {kind} file (magic number {found:08x}{whose}; expected {magic:08x}); "
            "check which file has which name, or get the file again"
        )
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(data) < header:
        raise UserError(
            f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte header; get the file again"
        )
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    if math.prod(shape) == 0:  # torchvision's reader fails on an empty body with a bare ValueError
        raise UserError(f"{path} holds no {kind}s (its header says {' x '.join(map(str, shape))}); get the file again")
    expected = header + math.prod(shape)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise UserError(
            f"{path} is {state}: {len(data)} bytes where its header ({' x '.join(map(str, shape))}) "
            f"needs {expected}; get the file again"
        )
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.NamedTemporaryFile(suffix=path.stem) as plain:  # torchvision reads a plain file by its path
        plain.write(data)
        plain.flush()
        return reader(plain.name)


def _content(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or first_line(err)}") from err
    if path.suffix != ".gz" or not data:  # an empty file is named by the header check
        return data
    if data[:2] != GZIP_MAGIC:
        raise UserError(
            f"{path} is not a gzip file (it starts with {data[:4].hex()}, not {GZIP_MAGIC.hex()}); if it is a plain "
            "IDX file, remove the .gz from its name, else get the file again"
        )
    try:
        return gzip.decompress(data)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # cut short, or its data or CRC damaged
        raise UserError(f"{path} is not a complete gzip file ({first_line(err)}); get the file again") from err


def _download(source: IdxSource, root: str) -> None:
    """torchvision's download into `<root>/<Class>/raw` (it checks each file's md5)."""
    try:
        source.tv_class(root, train=True, download=True)
    except Exception as err:  # no network, a refused connection, a corrupt file, a full disk, ...
        raise UserError(f"cannot download {source.name} into {root}: {first_line(err)}") from err


def _layouts(source: IdxSource) -> str:
    return (
        "expected the four IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in the folder or in its {source.raw_folder}/"
    )
