"""Chunk-aware reading of the store: gathers of scattered rows read each needed chunk once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

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

    Each chunk holding wanted rows is read once (the span of its wanted rows, on `workers` threads) and `transform`
    (e.g. pooling and flattening) runs on its rows as they arrive, each result written straight to its rows'
    places: memory holds the transformed result plus a few raw chunks, not the array. (dask's fancy indexing does
    the same at twice the time, P4, most of it building and walking the graph.)
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    in_chunk = np.split(order, np.flatnonzero(np.diff(rows[order] // array.chunks[0])) + 1) if len(rows) else []
    transform = transform or (lambda values: values)

    def read(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wanted = rows[positions]
        start = int(wanted[0])
        return positions, transform(array[start : int(wanted[-1]) + 1][wanted - start])

    sample = transform(np.zeros((1, *array.shape[1:]), dtype=array.dtype))
    result = np.empty((len(rows), *sample.shape[1:]), dtype=sample.dtype)
    with named_read_errors(array), ThreadPoolExecutor(max_workers=workers) as pool:
        for positions, values in pool.map(read, in_chunk):
            result[positions] = values
    return result


class CachedTargets:
    """Per-sample arrays of a split (teacher features, labels, logits: store paths), served in batches by chunk.

    `rows` restricts the epochs to a subset of the split (a labelled subset); by default every row is served.
    With `views` > 1 each row is served under one of the split's first `views` views (`view_draws`): the arrays an
    augmented view holds (the teacher's outputs) are read from that view, the others (labels) from the split.
    If the served rows fit `memory_bytes` (every view of them) they are read once (chunk by chunk, at the first
    batch) and kept in RAM, and an epoch is a random permutation of the rows, each drawing its own view. Otherwise
    they are streamed: an epoch shuffles the order of blocks (each block is a chunk-aligned region of every array),
    reads `window` blocks at a time on a background thread, and shuffles rows within each window; a block's rows
    share the view drawn for it, so every read is whole chunks of one view (rows drawing their views one by one
    would read every view of every block). Either way `epoch_order` and `view_draws` say which rows come in which
    order under which view, so the caller loads the matching images: targets and images stay paired by row.
    """

    def __init__(
        self,
        split,
        paths: list[str],
        memory_bytes: int,
        window: int | None = None,
        rows: np.ndarray | None = None,
        views: int = 1,
    ) -> None:
        self.split, self.paths = split, list(paths)
        self.views = [split.view(v) for v in range(views)]
        augmented = set(self.views[1].group.attrs["arrays"]) if views > 1 else set()
        self.varies = [p in augmented for p in self.paths]  # read from the row's view, not from the split
        self.rows = np.arange(split.num_samples) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        self.num_rows = len(self.rows)
        arrays = [split.array(p) for p in self.paths]
        row_bytes = sum(int(a.nbytes) // max(a.shape[0], 1) for a in arrays)
        view_bytes = sum(int(a.nbytes) // max(a.shape[0], 1) for a, v in zip(arrays, self.varies, strict=True) if v)
        self.nbytes = (row_bytes + (views - 1) * view_bytes) * self.num_rows  # what RAM would hold: served rows only
        self.in_memory = self.nbytes <= memory_bytes
        # Streamed, about three windows live at once (the one served, the one prefetched, their concatenation).
        block_bytes = row_bytes * split.block_rows
        self.window = window or max(1, int(memory_bytes / (3 * block_bytes)) if block_bytes else 1)
        blocks = self.rows // split.block_rows
        self._blocks, starts = np.unique(blocks, return_index=True)
        self._rows_by_block = dict(zip(self._blocks.tolist(), np.split(self.rows, starts[1:]), strict=True))
        self._ram: list[np.ndarray] | None = None

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def order(self) -> str:
        """How epochs are ordered, which decides the sample order of every epoch (so a resumed run must match)."""
        if self.in_memory:
            return "in RAM" + (", a view per row" if self.num_views > 1 else "")
        window = f"streamed, {self.window} block{'s' * (self.window != 1)} per window"
        return window + (", a view per block" if self.num_views > 1 else "")

    def _in_ram(self) -> list[np.ndarray]:
        """The served rows of every array, read once; row r of the split is at position searchsorted(rows, r) (of
        every view, stacked first, for the arrays that vary by view)."""
        if self._ram is None:
            self._ram = []
            for path, varies in zip(self.paths, self.varies, strict=True):
                values = [self._read_rows(view, path) for view in (self.views if varies else self.views[:1])]
                self._ram.append(np.stack(values) if varies else values[0])
        return self._ram

    def _read_rows(self, part, path: str) -> np.ndarray:
        if self.num_rows == self.split.num_samples:
            return part.read(path)
        values = gather_rows(part.array(path), self.rows)
        part.check(path, values, self.rows)
        return values

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

    def view_draws(self, windows: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """The view of each row of `windows` (uniform over the views): drawn per row in RAM, per block streamed."""
        if self.in_memory:
            return [rng.integers(self.num_views, size=len(rows)) for rows in windows]
        draws = []
        for rows in windows:
            blocks = rows // self.split.block_rows
            unique = np.unique(blocks)
            draws.append(rng.integers(self.num_views, size=len(unique))[np.searchsorted(unique, blocks)])
        return draws

    def batches(
        self, windows: list[np.ndarray], batch_size: int, views: list[np.ndarray] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
        """(rows, their views, [values per array]) for consecutive `batch_size` rows of the order, under `views`
        (`view_draws`; default view 0); the last partial batch is dropped. In RAM, each batch is gathered on its
        own; streamed windows are read one ahead on a background thread."""
        views = views or [np.zeros(len(rows), dtype=np.int64) for rows in windows]
        if self.in_memory:
            ram, order, view_order = self._in_ram(), np.concatenate(windows), np.concatenate(views)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                rows, row_views = order[start : start + batch_size], view_order[start : start + batch_size]
                positions = np.searchsorted(self.rows, rows)
                values = [
                    v[row_views, positions] if varies else v[positions]
                    for v, varies in zip(ram, self.varies, strict=True)
                ]
                yield rows, row_views, values
            return
        pending: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._load, windows[0], views[0]) if windows else None
            for i, (rows, row_views) in enumerate(zip(windows, views, strict=True)):
                values = future.result()
                if i + 1 < len(windows):
                    future = pool.submit(self._load, windows[i + 1], views[i + 1])
                pending.append((rows, row_views, values))
                stacked_rows = np.concatenate([p[0] for p in pending])
                stacked_views = np.concatenate([p[1] for p in pending])
                stacked = [np.concatenate([p[2][k] for p in pending]) for k in range(len(self.paths))]
                usable = len(stacked_rows) - len(stacked_rows) % batch_size
                for start in range(0, usable, batch_size):
                    batch = slice(start, start + batch_size)
                    yield stacked_rows[batch], stacked_views[batch], [v[batch] for v in stacked]
                pending = [(stacked_rows[usable:], stacked_views[usable:], [v[usable:] for v in stacked])]

    def _load(self, rows: np.ndarray, views: np.ndarray) -> list[np.ndarray]:
        """Targets of `rows` in that order, reading the whole blocks the window spans, each from its view."""
        block_rows = self.split.block_rows
        blocks, first = np.unique(rows // block_rows, return_index=True)  # only the last block can be short
        position = np.searchsorted(blocks, rows // block_rows) * block_rows + rows % block_rows
        ranges = [self.split.block_range(int(b)) for b in blocks]
        block_views = views[first]
        out = []
        for path, varies in zip(self.paths, self.varies, strict=True):
            parts = [self.views[int(v)] if varies else self.split for v in block_views]
            values = np.concatenate(
                [p.read(path, slice(start, stop)) for p, (start, stop) in zip(parts, ranges, strict=True)]
            )
            out.append(values[position])
        return out
