"""Layout, provenance and completion tracking of the feature store.

The layout is `cache.schema`'s (docs/store.md has it whole).

Rows are written in *blocks*: every array's chunk length divides the block length, so a block is a
chunk-aligned region of every array and can be written by any process independently (the torchrun shards of
the future). A block is marked done only after all its chunks are written; a split, and then the store, is
marked complete only when every block of every view is done. Plain `zarr.open_group` / `dask.array.from_zarr` read it
all: view 0 is the split's own arrays (what score reads), view v the same paths under `views/<v>/`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import DamagedStoreError, StoreError
from .location import is_remote, location, remove_tree, tree_bytes, walk_files, zarr_store
from .records import Picks, SplitRecord, StoreIdentity, StoreProvenance
from .schema import (
    ATTR_KEY,
    DEFAULT_COMPRESSION,
    FORMAT_VERSION,
    INDICES,
    LABELS,
    LOGITS,
    PARAMS_ARRAY,
    PROGRESS,
    STORE_NAME,
    VIEWS,
    feature_path,
)

MIN_CHUNK_BYTES = 4 << 20  # feature chunks hold at least 4 MiB where N allows (fewer, cheaper writes)
MAX_CHUNK_ROWS = 4096  # bounds the block, hence the resume and sharding granularity
UNFINISHED_WRITE = ".partial"  # zarr's local store writes a file under this suffix, then renames it into place
UNREADABLE = (ValueError, TypeError, KeyError)  # what zarr raises for metadata that is not JSON or not Zarr's


REBUILD = "kdpipe extract --overwrite rebuilds the store"


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array of a split: `shape` excludes the leading sample axis."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    sets_block: bool = True  # per-sample metadata (labels, indices) follows the features' block instead
    attributes: dict[str, Any] | None = None  # the array's own attributes (a view's parameter columns)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


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


FINITE_CHECK_BYTES = 64 * 2**20  # rows checked at a time: the check's masks stay this small whatever the array


def first_non_finite_row(rows: np.ndarray) -> int | None:
    """The first row holding NaN or an infinity, or None. float16 is checked on its bits (all exponent bits set),
    which is faster; the writer runs this on every batch. Blocks of rows are checked in turn, so that a whole array
    loaded into RAM (1.8 GiB for a stem tap of 60,000 images) is not copied twice over by the check."""
    step = max(1, FINITE_CHECK_BYTES // max(1, rows[:1].nbytes))
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        bad = (block.view(np.uint16) & 0x7C00) == 0x7C00 if block.dtype == np.float16 else ~np.isfinite(block)
        bad_rows = bad.reshape(len(block), -1).any(1)
        if bad_rows.any():
            return start + int(np.argmax(bad_rows))
    return None


def _member(group: zarr.Group, path: Path, name: str, split: str):
    """`group[name]`, or StoreError naming its metadata file (`path` is the group's folder) when that is missing
    or unreadable."""
    try:
        return group[name]
    except UNREADABLE as err:
        meta = path / name / "zarr.json"
        state = f"unreadable ({_reason(err)})" if meta.is_file() else "missing"
        raise StoreError(f"{meta} is {state}: the same kdpipe extract writes split {split!r} again") from None


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
    """One split's group (in the folder `path`): arrays, the per-block progress flags and the completion state.

    `num_classes` bounds the labels `read` accepts (None: only that they are not negative).
    """

    def __init__(self, group: zarr.Group, path: Path, num_classes: int | None = None, name: str | None = None) -> None:
        self.group, self.path, self.num_classes = group, path, num_classes
        self.name = name or group.basename
        if "arrays" not in group.attrs:
            raise StoreError(
                f"split {self.name!r} of {path.parent} was never finished (its creation was interrupted); "
                "rerun the same kdpipe extract"
            )
        self.num_samples: int = group.attrs["num_samples"]
        self.block_rows: int = group.attrs["block_rows"]
        self.dataset_size: int | None = group.attrs.get("dataset_size")  # bounds the indices `read` accepts

    def read(self, path: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """`array[rows]`, checked: a damaged chunk, or a value no writer stores, is a StoreError naming the array (and
        missing or unreadable metadata one naming its file, as `array` does)."""
        array = self.array(path)
        with named_read_errors(array):
            values = array[rows] if isinstance(rows, slice) else array.get_orthogonal_selection((rows,))
        positions = np.arange(array.shape[0])[rows]
        self.check(path, values, positions)
        return values

    def check(self, path: str, values: np.ndarray, positions: np.ndarray) -> None:
        """Refuses values the writer never stores (see `first_bad_row`), naming the array and row."""
        bad = self.first_bad_row(path, values)
        if bad is not None:
            row, what = bad
            raise StoreError(
                f"{self.name}/{path} row {int(positions[row])} holds {what} (a missing or damaged chunk reads so); "
                "`kdpipe verify --repair` marks it for recomputation by the same kdpipe extract"
            )

    def first_bad_row(self, path: str, values: np.ndarray) -> tuple[int, str] | None:
        """(position in `values`, what is wrong) of the first row no writer stores: non-finite floats, labels outside
        the classes, indices outside the dataset, a view's parameters negative (its crop box and flip never are);
        None when all are sound. A missing chunk reads as NaN or -1 (its fill value), so it is caught here too."""
        if values.dtype.kind == "f":
            row = first_non_finite_row(values)
            return None if row is None else (row, "a value NaN or Inf")
        if path == PARAMS_ARRAY:
            bad = (values < 0).reshape(len(values), -1).any(1)
        elif path in (LABELS, INDICES):
            upper = self.num_classes if path == LABELS else self.dataset_size
            bad = (values < 0) | (values >= (upper or np.iinfo(values.dtype).max))
        else:
            return None
        return (int(np.flatnonzero(bad)[0]), "a value out of range") if bad.any() else None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.block_rows)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.num_samples)

    def array(self, path: str) -> zarr.Array:
        return _member(self.group, self.path, path, self.name.split("/")[0])  # a view's split is written again whole

    @property
    def tap_names(self) -> list[str]:
        return list(self.group.attrs["taps"])

    def feature(self, tap: str) -> zarr.Array:
        return self.array(feature_path(tap))

    def missing_blocks(self) -> list[int]:
        done = self.array(PROGRESS)[:]
        return [int(b) for b in np.flatnonzero(done == 0)]

    def mark_block_done(self, block: int) -> None:
        self.array(PROGRESS)[block] = 1

    @property
    def num_views(self) -> int:
        """View 0 (the split's own arrays) and the augmented views under views/ (1 for a store without)."""
        return int(self.group.attrs.get("views", 1))

    def view(self, view: int) -> SplitStore:
        """View `view`'s arrays and block flags: the split itself for view 0."""
        if view == 0:
            return self
        if not 0 < view < self.num_views:
            raise StoreError(f"split {self.name!r} has views 0..{self.num_views - 1}, not view {view}")
        group = _member(self.group, self.path, f"{VIEWS}/{view}", self.name)
        return SplitStore(group, self.path / VIEWS / str(view), self.num_classes, f"{self.name}/{VIEWS}/{view}")

    def views(self) -> list[SplitStore]:
        return [self.view(v) for v in range(self.num_views)]

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def check_written(self) -> list[SplitStore]:
        """Refuses a split with a block of any view unwritten; returns the views."""
        views = self.views()
        missing = sum(len(v.missing_blocks()) for v in views)
        if missing:
            raise StoreError(f"split {self.name!r} still has {missing} unwritten blocks")
        return views

    def mark_complete(self) -> None:
        """Marks every view complete (its flag is the split's), once every block of every view is written."""
        views = self.check_written()
        for view in views[1:]:
            view.group.attrs["complete"] = True
        self.group.attrs["complete"] = True

    def mark_incomplete(self) -> None:
        for view in self.views():
            view.group.attrs["complete"] = False

    @property
    def record(self) -> SplitRecord:
        """The split's attributes, as they are now."""
        return SplitRecord.from_json(dict(self.group.attrs))

    @property
    def array_names(self) -> list[str]:
        """The paths of the arrays the split was created with (`cache.schema`)."""
        return self.record.arrays

    def record_scores(self, scores: Picks) -> None:
        """Keeps what `kdpipe score` picked, and every tap's Q, with the split."""
        self.group.attrs["scores"] = scores.to_json()

    def arrays(self) -> dict[str, zarr.Array]:
        return {path: self.array(path) for path in self.array_names}

    def stored_arrays(self) -> list[StoredArray]:
        """Every array's shape, chunking and size, raw and stored."""
        return [
            StoredArray(path, a.shape, str(a.dtype), a.chunks[0], a.nbytes, tree_bytes(self.path / path / "c"))
            for path, a in self.arrays().items()
        ]

    def check_metadata(self, identity: StoreIdentity | None = None) -> None:
        """Reads every view's arrays' metadata, progress flags included, and checks it against what kdpipe created
        (`check_layout`): StoreError names the first unreadable or altered one."""
        for view in self.views():
            view.check_layout(identity)

    def check_layout(self, identity: StoreIdentity | None = None) -> None:
        """Every array's metadata as kdpipe creates it, against the split's own record and the store's identity:
        a row per sample, chunked along rows only in chunks that divide the block, a missing chunk reading as NaN
        (floats) or -1 (integers), checksummed chunks, a feature array of its tap's shape and the feature dtype,
        logits as wide as the classes, one progress flag per block. Metadata rewritten by another tool, a hand edit
        or a partial sync is a DamagedStoreError naming the array and the field, not numbers read wrong."""
        for path, array in self.arrays().items():
            where = f"{self.name}/{path}"
            _expect(where, "rows", array.shape[0], self.num_samples)
            _expect(where, "chunk shape", tuple(array.chunks[1:]), tuple(array.shape[1:]))
            if self.num_blocks > 1 and self.block_rows % array.chunks[0]:  # one block: its length is the split's
                blocks = f"chunks of {array.chunks[0]} rows that do not divide the block of {self.block_rows}"
                raise DamagedStoreError(f"{where}: {blocks}; {REBUILD}")
            _expect(where, "fill value", _fill_text(array.fill_value), _fill_text(_missing_value(str(array.dtype))))
            _expect(where, "checksum", "crc32c" in _codec_names(array), True)
            if identity is not None:
                _check_against_identity(where, path, array, identity)
        progress = self.array(PROGRESS)
        _expect(f"{self.name}/{PROGRESS}", "shape", progress.shape, (self.num_blocks,))


class FeatureStore:
    """A kdpipe store on disk. `create` lays it out; `open` checks it is one, of a format this version reads."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path, self.group = path, group

    @staticmethod
    def locate(path: str | Path) -> Path:
        """The store at `path` (a local path or a URL), or the one inside `path` when given an extract output folder."""
        path = location(path)
        if not (path / "zarr.json").is_file() and (path / STORE_NAME).is_dir():
            path = path / STORE_NAME
        if not (path / "zarr.json").is_file() and any(path.glob("*/zarr.json")):
            raise DamagedStoreError(f"{path / 'zarr.json'}, the store's root metadata, is missing; {REBUILD}")
        if not (path / "zarr.json").is_file():
            out = path.parent if path.name == STORE_NAME else path  # what `kdpipe extract --out` names: the folder
            raise StoreError(f"no feature store at {path}; `kdpipe extract --out {out}` makes one")
        return path

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Opens the store at `path`, or the one inside `path` when given an extract output folder."""
        path = cls.locate(path)
        try:
            group = zarr.open_group(zarr_store(path, read_only=mode == "r"), mode=mode)
        except UNREADABLE as err:
            raise DamagedStoreError(f"{path / 'zarr.json'} is unreadable ({_reason(err)}); {REBUILD}") from None
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
    def open_complete(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Opens the store at `path` as `open` does, refused unless every split of it is complete: the one guard of
        every reader of a finished store."""
        store = cls.open(path, mode=mode)
        if not store.complete:
            raise StoreError(f"{store.path} is incomplete; finish it by rerunning the same kdpipe extract")
        identity = store.identity
        for part in store.splits():
            part.check_metadata(identity)
        return store

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], overwrite: bool = False) -> FeatureStore:
        path = location(path)
        if path.exists():
            if not overwrite:
                raise StoreError(f"{path} already exists")
            if not path.is_dir() or not _zarr_files_only(path):
                raise StoreError(f"{path} exists and is not a Zarr store; refusing to delete it")
            if _foreign_group(path):
                raise StoreError(f"{path} is a Zarr group kdpipe did not write; refusing to delete it")
            remove_tree(path)
        try:
            # the attributes in the group's first write: no moment when kdpipe's new store looks like another tool's
            attributes = {ATTR_KEY: {**meta, "format_version": FORMAT_VERSION, "complete": False}}
            group = zarr.open_group(zarr_store(path, read_only=False), mode="w-", attributes=attributes)
        except OSError:  # a full disk: no half-made store left for the next run to refuse
            with contextlib.suppress(OSError):
                remove_tree(path)
            raise
        return cls(path, group)

    def discard_unfinished_writes(self) -> int:
        """Deletes the temporary files of writes a killed process never renamed into place; returns how many.
        What they held is missing from the store (its block is not flagged done), so it is written again; left
        behind, they would make a resumed store's files differ from an uninterrupted one's. Only a writer holding
        the store's lock may call this. Object stores write each object whole and leave nothing to discard."""
        if is_remote(self.path):
            return 0
        unfinished = [self.path / name for name in walk_files(self.path) if name.endswith(UNFINISHED_WRITE)]
        for file in unfinished:
            file.unlink(missing_ok=True)
        return len(unfinished)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs[ATTR_KEY])

    @property
    def identity(self) -> StoreIdentity:
        """What determines the store's contents (`cache.records`)."""
        return StoreIdentity.from_json(self.meta["identity"])

    @property
    def provenance(self) -> StoreProvenance:
        """Who wrote the store, when, and where its teacher's weights and data were found (`cache.records`)."""
        return StoreProvenance.from_json(self.meta)

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
        """The split groups on disk (their folders holding metadata, readable or not), in order."""
        return sorted(p.name for p in self.path.iterdir() if (p / "zarr.json").is_file())

    def expected_splits(self) -> list[str]:
        """The splits on disk and those the store's identity records (missing until extract has written them)."""
        recorded = self.meta.get("identity", {}).get("dataset", {}).get("splits", {})
        return sorted(set(self.split_names()) | set(recorded))

    def splits(self) -> list[SplitStore]:
        return [self.split(name) for name in self.split_names()]

    def split_created(self, name: str) -> bool:
        """Whether the split is on disk and its creation finished (its attributes are written last); StoreError
        when its metadata is unreadable."""
        return name in self.split_names() and "arrays" in _member(self.group, self.path, name, name).attrs

    def remove_split(self, name: str) -> None:
        if (self.path / name).exists():
            remove_tree(self.path / name)

    def split(self, name: str) -> SplitStore:
        if name not in self.split_names():
            raise StoreError(
                f"store {self.path} has no split {name!r}; it has {', '.join(self.split_names()) or 'none'}"
            )
        return SplitStore(_member(self.group, self.path, name, name), self.path / name, self._num_classes())

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
        view_specs: list[ArraySpec] | None = None,
        views: int = 1,
    ) -> SplitStore:
        """Creates the split's arrays (empty) and its progress flags, all blocks pending; with `views` > 1 also the
        augmented views' groups, each holding `view_specs`. The split's attributes are written last: they say its
        creation finished."""
        rows, block = plan_chunks(specs, num_samples)
        group = self.group.create_group(name)
        _create_arrays(group, specs, rows, block, num_samples, compression)
        layout = {"num_samples": num_samples, "block_rows": block, "taps": taps, "complete": False}
        for view in range(1, views):
            view_rows, view_block = plan_chunks(view_specs, num_samples)
            if view_block != block:  # the blocks of every view must coincide (one flag per block and view)
                raise ValueError(f"view block {view_block} differs from the split's {block}")
            view_group = group.create_group(f"{VIEWS}/{view}")
            _create_arrays(view_group, view_specs, view_rows, block, num_samples, compression)
            view_group.attrs.update({**layout, "view": view, "arrays": [s.path for s in view_specs]})
        group.attrs.update({**attrs, **layout, "views": views, "arrays": [s.path for s in specs]})
        return SplitStore(group, self.path / name, self._num_classes())


def _create_arrays(
    group: zarr.Group, specs: list[ArraySpec], rows: dict[str, int], block: int, num_samples: int, compression: str
) -> None:
    """One group's per-sample arrays (empty) and its block flags, all pending."""
    for spec in specs:
        group.create_array(
            spec.path,
            shape=(num_samples, *spec.shape),
            chunks=(rows[spec.path], *spec.shape),
            dtype=spec.dtype,
            compressors=compressors(compression),
            fill_value=_missing_value(spec.dtype),
            attributes=spec.attributes,
        )
    group.create_array(PROGRESS, shape=(math.ceil(num_samples / block),), chunks=(1,), dtype="uint8", fill_value=0)


def _foreign_group(path) -> bool:
    """Whether `path` holds a readable Zarr group without kdpipe's attribute: another tool's data, never deleted.
    Unreadable root metadata is what a damaged store looks like, and extract --overwrite rebuilds it."""
    root = path / "zarr.json"
    try:
        metadata = json.loads(root.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and ATTR_KEY not in (metadata.get("attributes") or {})


def _zarr_files_only(path) -> bool:
    """Whether every file under `path` is Zarr metadata, a chunk (under a `c` folder) or a write zarr left unfinished:
    a store, or what an interrupted deletion or a damaged disk left of one. Only such a folder is ever deleted."""
    for file in walk_files(path):
        *folders, name = file.split("/")
        if "c" not in folders and name != "zarr.json" and not name.endswith(UNFINISHED_WRITE):  # chunk folders: chunks
            return False
    return True


def _expect(where: str, field: str, found: Any, expected: Any) -> None:
    if found != expected:
        raise DamagedStoreError(
            f"{where}: {field} {found} in its metadata, not {expected} as kdpipe created it; {REBUILD}"
        )


def _check_against_identity(where: str, path: str, array: zarr.Array, identity: StoreIdentity) -> None:
    """A feature array of its tap's recorded shape and the feature dtype; logits as wide as the classes."""
    taps = {feature_path(t["name"]): tuple(t["shape"]) for t in identity.taps}
    if path in taps:
        _expect(where, "sample shape", tuple(array.shape[1:]), taps[path])
        _expect(where, "dtype", str(array.dtype), identity.feature_dtype)
    elif path == LOGITS:
        _expect(where, "width", tuple(array.shape[1:]), (identity.dataset.num_classes,))


def _fill_text(value: Any) -> str:
    """A fill value as comparable text (NaN equals NaN)."""
    return str(float(value)) if isinstance(value, (float, np.floating)) else str(value)


def _codec_names(array: zarr.Array) -> set[str]:
    return {type(codec).__name__.lower().removesuffix("codec") for codec in array.compressors}


def _missing_value(dtype: str) -> float | int:
    """What a missing chunk reads as: NaN for floats (caught by the finite checks), -1 for integers."""
    return float("nan") if np.dtype(dtype).kind == "f" else -1


@dataclass(frozen=True)
class StoredArray:
    """An array as the store holds it, for reports: its path in its split (or view), shape, dtype, chunk length in
    rows, and its raw bytes and stored bytes (its chunk files or objects, compressed; metadata excluded)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    raw_bytes: int
    stored_bytes: int
