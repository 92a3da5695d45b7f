"""Chunk-aware reading of the store: gathers of scattered rows read each needed chunk once, through dask."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import dask
import dask.array as da
import numpy as np
import zarr

from .store import named_read_errors


def gather_rows(
    array: zarr.Array,
    rows: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    workers: int = 2,
) -> np.ndarray:
    """`array[rows]` in the order given, reading chunk by chunk, never sample by sample.

    Rows are sorted so dask takes them chunk by chunk; `transform` (e.g. pooling and flattening) runs on each
    chunk's rows as they are read, so memory holds the transformed result plus a few raw chunks, not the array.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    lazy = da.from_zarr(array)[rows[order]]
    if transform is not None:
        sample = transform(np.zeros((1, *array.shape[1:]), dtype=array.dtype))
        lazy = lazy.map_blocks(
            transform,
            dtype=sample.dtype,
            chunks=(lazy.chunks[0], *sample.shape[1:]),
            drop_axis=list(range(sample.ndim, lazy.ndim)) or None,
        )
    with dask.config.set(scheduler="threads", num_workers=workers), named_read_errors(array):
        gathered = lazy.compute()
    result = np.empty_like(gathered)
    result[order] = gathered
    return result


class CachedTargets:
    """Per-sample arrays of a split (teacher features, labels, logits: store paths), served in batches by chunk.

    `rows` restricts the epochs to a subset of the split (a labelled subset); by default every row is served.
    If the served rows fit `memory_bytes` they are read once (chunk by chunk, at the first batch) and kept in RAM,
    and an epoch is a
    random permutation of the rows. Otherwise they are streamed: an epoch shuffles the order of blocks (each
    block is a chunk-aligned region of every array), reads `window` blocks at a time on a background thread,
    and shuffles rows within each window. Either way `epoch_order` says which rows come in which order, so the
    caller loads the matching images: targets and images stay paired by row.
    """

    def __init__(
        self, split, paths: list[str], memory_bytes: int, window: int | None = None, rows: np.ndarray | None = None
    ) -> None:
        self.split, self.paths = split, list(paths)
        self.arrays = [split.array(p) for p in self.paths]
        self.rows = np.arange(split.num_samples) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        self.num_rows = len(self.rows)
        row_bytes = sum(int(a.nbytes) // max(a.shape[0], 1) for a in self.arrays)
        self.nbytes = row_bytes * self.num_rows  # what RAM would hold: the served rows only
        self.in_memory = self.nbytes <= memory_bytes
        # Streamed, about three windows live at once (the one served, the one prefetched, their concatenation).
        block_bytes = row_bytes * split.block_rows
        self.window = window or max(1, int(memory_bytes / (3 * block_bytes)) if block_bytes else 1)
        blocks = self.rows // split.block_rows
        self._blocks, starts = np.unique(blocks, return_index=True)
        self._rows_by_block = dict(zip(self._blocks.tolist(), np.split(self.rows, starts[1:]), strict=True))
        self._ram: list[np.ndarray] | None = None

    @property
    def order(self) -> str:
        """How epochs are ordered, which decides the sample order of every epoch (so a resumed run must match)."""
        return "in RAM" if self.in_memory else f"streamed, {self.window} block{'s' * (self.window != 1)} per window"

    def _in_ram(self) -> list[np.ndarray]:
        """The served rows of every array, read once; row r of the split is at position searchsorted(rows, r)."""
        if self._ram is None:
            whole = self.num_rows == self.split.num_samples
            self._ram = []
            for path, array in zip(self.paths, self.arrays, strict=True):
                if whole:
                    values = self.split.read(path)
                else:
                    values = gather_rows(array, self.rows)
                    self.split.check(path, values, self.rows)
                self._ram.append(values)
        return self._ram

    def epoch_order(self, rng: np.random.Generator, at_least: int = 1) -> list[np.ndarray]:
        """The epoch's rows as windows (one window per pass when in RAM); concatenated they are the sample order.
        Fewer rows than `at_least` (a labelled subset smaller than a batch) are served in as many shuffled passes
        as fill it, as semi-supervised recipes cycle a small labelled set (FixMatch's 40 labels, batch 64)."""
        passes = -(-at_least // self.num_rows)
        return [window for _ in range(passes) for window in self._one_pass(rng)]

    def _one_pass(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self.in_memory:
            return [rng.permutation(self.rows)]
        blocks = rng.permutation(self._blocks)
        windows = []
        for start in range(0, len(blocks), self.window):
            rows = np.concatenate([self._rows_by_block[int(b)] for b in blocks[start : start + self.window]])
            windows.append(rng.permutation(rows))
        return windows

    def batches(self, windows: list[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """(rows, [values per array]) for consecutive `batch_size` rows of the order; the last partial batch is
        dropped. In RAM, each batch is gathered on its own; streamed windows are read one ahead on a background
        thread."""
        if self.in_memory:
            ram, order = self._in_ram(), np.concatenate(windows)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                rows = order[start : start + batch_size]
                positions = np.searchsorted(self.rows, rows)
                yield rows, [values[positions] for values in ram]
            return
        pending_rows: list[np.ndarray] = []
        pending_values: list[list[np.ndarray]] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._load, windows[0]) if windows else None
            for i, rows in enumerate(windows):
                values = future.result()
                if i + 1 < len(windows):
                    future = pool.submit(self._load, windows[i + 1])
                pending_rows.append(rows)
                pending_values.append(values)
                stacked_rows = np.concatenate(pending_rows)
                stacked = [np.concatenate([v[k] for v in pending_values]) for k in range(len(self.arrays))]
                usable = len(stacked_rows) - len(stacked_rows) % batch_size
                for start in range(0, usable, batch_size):
                    yield stacked_rows[start : start + batch_size], [v[start : start + batch_size] for v in stacked]
                pending_rows = [stacked_rows[usable:]]
                pending_values = [[v[usable:] for v in stacked]]

    def _load(self, rows: np.ndarray) -> list[np.ndarray]:
        """Targets of `rows` in that order, reading the whole blocks the window spans."""
        block_rows = self.split.block_rows
        blocks = np.unique(rows // block_rows)  # only the array's last block can be short, and it sorts last
        position = np.searchsorted(blocks, rows // block_rows) * block_rows + rows % block_rows
        ranges = [self.split.block_range(int(b)) for b in blocks]
        out = []
        for path in self.paths:
            values = np.concatenate([self.split.read(path, slice(start, stop)) for start, stop in ranges])
            out.append(values[position])
        return out
