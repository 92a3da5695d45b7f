"""Chunk-aware reading of the store: gathers of scattered rows read each needed chunk once, through dask."""

from __future__ import annotations

from typing import Callable

import dask
import dask.array as da
import numpy as np
import zarr


def gather_rows(
    array: zarr.Array, rows: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None,
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
            transform, dtype=sample.dtype, chunks=(lazy.chunks[0], *sample.shape[1:]),
            drop_axis=list(range(sample.ndim, lazy.ndim)) or None,
        )
    with dask.config.set(scheduler="threads", num_workers=workers):
        gathered = lazy.compute()
    result = np.empty_like(gathered)
    result[order] = gathered
    return result
