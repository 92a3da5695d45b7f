"""Layout, provenance and completion tracking of the feature store.

    features.zarr/                 attrs["kdpipe"]: format version, provenance, config hash, `complete`
      <split>/                     attrs: num_samples, block_rows, fingerprint, `complete`
        features/<tap>             (N, *tap_shape) float16, chunked along N only
        labels, indices            (N,) int64
        logits                     (N, num_classes) float32
        progress                   (num_blocks,) uint8, one chunk per block: 1 once the block is fully written

Rows are written in *blocks*: every array's chunk length divides the block length, so a block is a
chunk-aligned region of every array and can be written by any process independently (the torchrun shards of
the future). A block is marked done only after all its chunks are written; a split, and then the store, is
marked complete only when every block is done. Plain `zarr.open_group` / `dask.array.from_zarr` read it all.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

FORMAT_VERSION = 1
STORE_NAME = "features.zarr"  # the store's name inside an extract output folder
ATTR_KEY = "kdpipe"
FEATURES = "features"
PROGRESS = "progress"
MIN_CHUNK_BYTES = 4 << 20  # feature chunks hold at least 4 MiB where N allows (fewer, cheaper writes)
MAX_CHUNK_ROWS = 4096  # bounds the block, hence the resume and sharding granularity


class StoreError(Exception):
    """A store that is missing, foreign, newer, incomplete or inconsistent with what the caller expects."""


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array of a split: `shape` excludes the leading sample axis."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    sets_block: bool = True  # per-sample metadata (labels, indices) follows the features' block instead

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


# Picked by benchmarks/p5_storage.py on real activations: 0.45 of float32 bytes (zstd:1:shuffle 0.30) at 4x the
# encode and decode speed of zstd, which the teacher's cores and the streamed distillation loader both feel.
DEFAULT_COMPRESSION = "lz4:5:bitshuffle"
BLOSC_NAMES = ("zstd", "lz4", "lz4hc", "blosclz", "zlib")
SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")


def compressors(compression: str = DEFAULT_COMPRESSION) -> list:
    """Blosc `cname:clevel:shuffle` (or `none`), then a crc32c checksum so a corrupted chunk fails loudly
    instead of decoding to garbage."""
    if compression == "none":
        return [Crc32cCodec()]
    parts = compression.split(":")
    cname, clevel, shuffle = parts[0], parts[1] if len(parts) > 1 else "1", parts[2] if len(parts) > 2 else "shuffle"
    if (
        len(parts) > 3
        or cname not in BLOSC_NAMES
        or shuffle not in SHUFFLES
        or not clevel.isdigit()
        or not 0 <= int(clevel) <= 9
    ):
        raise StoreError(
            f"compression {compression!r}: expected none or CNAME[:LEVEL[:SHUFFLE]] with CNAME in "
            f"{', '.join(BLOSC_NAMES)}, LEVEL 0-9, SHUFFLE in {', '.join(SHUFFLES)}"
        )
    return [BloscCodec(cname=cname, clevel=int(clevel), shuffle=shuffle), Crc32cCodec()]


def chunk_rows(row_bytes: int) -> int:
    """The smallest power of two of rows making a chunk of at least MIN_CHUNK_BYTES, at most MAX_CHUNK_ROWS."""
    rows = 1 << max(0, math.ceil(math.log2(max(1, MIN_CHUNK_BYTES / max(row_bytes, 1)))))
    return min(rows, MAX_CHUNK_ROWS)


def plan_chunks(specs: list[ArraySpec], num_samples: int) -> tuple[dict[str, int], int]:
    """Chunk rows per array and the block length. Powers of two make every chunk length divide the block.

    The block is the longest chunk among the arrays that set it (the features); narrow per-sample arrays get
    at most one block per chunk, so a few bytes of labels do not stretch the block to MAX_CHUNK_ROWS.
    """
    rows = {s.path: chunk_rows(s.row_bytes) for s in specs}
    block = max((rows[s.path] for s in specs if s.sets_block), default=max(rows.values()))
    rows = {path: min(r, block) for path, r in rows.items()}
    if block >= num_samples:  # a single block: its only boundaries are 0 and N, aligned for every array
        return {p: min(r, num_samples) for p, r in rows.items()}, num_samples
    return rows, block


@contextlib.contextmanager
def named_read_errors(array: zarr.Array) -> Iterator[None]:
    """A chunk that fails its checksum or does not decode is reported with its array, not as a codec error."""
    try:
        yield
    except (ValueError, RuntimeError) as err:
        raise StoreError(
            f"{array.path}: a chunk is damaged ({str(err).splitlines()[0]}); `kdpipe verify` lists every damaged chunk"
        ) from err


class SplitStore:
    """One split's group: arrays, the per-block progress flags and the completion state.

    `num_classes` bounds the labels `read` accepts (None: only that they are not negative).
    """

    def __init__(self, group: zarr.Group, num_classes: int | None = None) -> None:
        self.group = group
        self.name = group.basename
        self.num_samples: int = group.attrs["num_samples"]
        self.block_rows: int = group.attrs["block_rows"]
        self.num_classes = num_classes

    def read(self, path: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """`array[rows]`, checked: a damaged chunk, or a value no writer stores, is a StoreError naming the array."""
        array = self.group[path]
        with named_read_errors(array):
            values = array[rows] if isinstance(rows, slice) else array.get_orthogonal_selection((rows,))
        positions = np.arange(array.shape[0])[rows]
        self.check(path, values, positions)
        return values

    def check(self, path: str, values: np.ndarray, positions: np.ndarray) -> None:
        """Refuses values the writer never stores: non-finite floats, labels outside the classes, indices outside
        the dataset. A missing chunk reads as NaN or -1 (its fill value), so it is refused here too."""
        if values.dtype.kind == "f":
            bad, what = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1), "NaN or Inf"
        elif path in ("labels", "indices"):
            upper = self.num_classes if path == "labels" else self.group.attrs.get("dataset_size")
            bad, what = (values < 0) | (values >= (upper or np.iinfo(values.dtype).max)), "out of range"
        else:
            return
        if bad.any():
            row = int(positions[np.flatnonzero(bad)[0]])
            raise StoreError(
                f"{self.name}/{path} row {row} holds a value {what} (a missing or damaged chunk reads so); "
                "`kdpipe verify --repair` marks it for recomputation by the same kdpipe extract"
            )

    @property
    def path(self) -> Path:
        """The split's folder (the store is a local directory)."""
        return Path(self.group.store.root) / self.group.path

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.block_rows)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.num_samples)

    def array(self, path: str) -> zarr.Array:
        return self.group[path]

    @property
    def tap_names(self) -> list[str]:
        return list(self.group.attrs["taps"])

    def feature(self, tap: str) -> zarr.Array:
        return self.group[f"{FEATURES}/{tap}"]

    def missing_blocks(self) -> list[int]:
        done = self.group[PROGRESS][:]
        return [int(b) for b in np.flatnonzero(done == 0)]

    def mark_block_done(self, block: int) -> None:
        self.group[PROGRESS][block] = 1

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def mark_complete(self) -> None:
        if self.missing_blocks():
            raise StoreError(f"split {self.name!r} still has {len(self.missing_blocks())} unwritten blocks")
        self.group.attrs["complete"] = True

    def arrays(self) -> dict[str, zarr.Array]:
        return {path: self.group[path] for path in self.group.attrs["arrays"]}


class FeatureStore:
    """A kdpipe store on disk. `create` lays it out; `open` checks it is one, of a format this version reads."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path, self.group = path, group

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Opens the store at `path`, or the one inside `path` when given an extract output folder."""
        path = Path(path)
        if not (path / "zarr.json").is_file() and (path / STORE_NAME / "zarr.json").is_file():
            path = path / STORE_NAME
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no feature store at {path}")
        group = zarr.open_group(str(path), mode=mode)
        meta = group.attrs.get(ATTR_KEY)
        if not isinstance(meta, dict):
            raise StoreError(f"{path} is a Zarr group but not a kdpipe feature store")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format {meta['format_version']}, newer than this kdpipe reads ({FORMAT_VERSION});"
                " upgrade kdpipe"
            )
        return cls(path, group)

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], overwrite: bool = False) -> FeatureStore:
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise StoreError(f"{path} already exists")
            if not (path / "zarr.json").is_file():
                raise StoreError(f"{path} exists and is not a Zarr store; refusing to delete it")
            shutil.rmtree(path)
        try:
            group = zarr.open_group(str(path), mode="w-")
            group.attrs[ATTR_KEY] = {**meta, "format_version": FORMAT_VERSION, "complete": False}
        except OSError:  # a full disk: no half-made store left for the next run to refuse
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, group)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs[ATTR_KEY])

    def update_meta(self, **fields: Any) -> None:
        self.group.attrs[ATTR_KEY] = {**self.meta, **fields}

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    def mark_complete(self) -> None:
        incomplete = [s.name for s in self.splits() if not s.complete]
        if incomplete:
            raise StoreError(f"splits not complete: {', '.join(incomplete)}")
        self.update_meta(complete=True)

    def split_names(self) -> list[str]:
        return [name for name, _ in self.group.groups()]

    def splits(self) -> list[SplitStore]:
        return [self.split(name) for name in sorted(self.split_names())]

    def split_created(self, name: str) -> bool:
        """Whether the split's creation finished (its attributes are written last)."""
        return "arrays" in self.group[name].attrs

    def remove_split(self, name: str) -> None:
        shutil.rmtree(self.path / name)

    def split(self, name: str) -> SplitStore:
        if name not in self.split_names():
            raise StoreError(
                f"store {self.path} has no split {name!r}; it has {', '.join(self.split_names()) or 'none'}"
            )
        return SplitStore(self.group[name], self._num_classes())

    def _num_classes(self) -> int | None:
        return self.meta.get("identity", {}).get("dataset", {}).get("num_classes")

    def create_split(
        self,
        name: str,
        num_samples: int,
        specs: list[ArraySpec],
        taps: list[str],
        attrs: dict[str, Any],
        compression: str = DEFAULT_COMPRESSION,
    ) -> SplitStore:
        """Creates the split's arrays (empty) and its progress flags, all blocks pending."""
        rows, block = plan_chunks(specs, num_samples)
        group = self.group.create_group(name)
        for spec in specs:
            group.create_array(
                spec.path,
                shape=(num_samples, *spec.shape),
                chunks=(rows[spec.path], *spec.shape),
                dtype=spec.dtype,
                compressors=compressors(compression),
                fill_value=_missing_value(spec.dtype),
                config={"write_empty_chunks": True},  # skips zarr's per-chunk "all fill value?" scan (a third of
                # the write cost); every chunk written holds real rows anyway
            )
        group.create_array(PROGRESS, shape=(math.ceil(num_samples / block),), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs.update(
            {
                **attrs,
                "num_samples": num_samples,
                "block_rows": block,
                "taps": taps,
                "arrays": [s.path for s in specs],
                "complete": False,
            }
        )
        return SplitStore(group, self._num_classes())


def _missing_value(dtype: str) -> float | int:
    """What a missing chunk reads as: NaN for floats (caught by the finite checks), -1 for integers."""
    return float("nan") if np.dtype(dtype).kind == "f" else -1


def stored_bytes(store_path: Path, array: zarr.Array) -> int:
    """Bytes of an array's chunk files on disk (the store is a local directory; metadata excluded)."""
    chunk_dir = store_path / array.path / "c"
    return sum(f.stat().st_size for f in chunk_dir.rglob("*") if f.is_file()) if chunk_dir.is_dir() else 0
