"""Whole-store integrity check: every chunk decodes (crc32c), every flagged block has its chunk files, and the
completion flags agree with each other."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

from .store import PROGRESS, FeatureStore, SplitStore


def chunk_file(store_path: Path, array, index: int) -> Path:
    """The file of chunk `index` along the sample axis (default v3 key encoding: c/<i>/0/...)."""
    return store_path / array.path / "c" / str(index) / Path(*(["0"] * (array.ndim - 1)))


Progress = Callable[..., Iterable]  # tqdm-like: progress(iterable, desc=...) yields the items


def _no_progress(items: Iterable, **_) -> Iterable:
    return items


def verify_split(
    store: FeatureStore, part: SplitStore, progress: Progress = _no_progress
) -> tuple[list[str], set[int], int]:
    """Problems found in one split, the blocks they touch, and the number of chunks read."""
    problems, bad_blocks, checked = [], set(), 0
    done = set(range(part.num_blocks)) - set(part.missing_blocks())
    if part.complete and len(done) < part.num_blocks:
        problems.append(f"{part.name}: marked complete with {part.num_blocks - len(done)} blocks unwritten")
    for path, array in part.arrays().items():
        rows = array.chunks[0]
        for index in progress(range(math.ceil(array.shape[0] / rows)), desc=f"verify {part.name}/{path}", leave=False):
            start, stop = index * rows, min((index + 1) * rows, array.shape[0])
            block_done = all(b in done for b in range(start // part.block_rows, (stop - 1) // part.block_rows + 1))
            where = f"{part.name}/{path} chunk {index} (rows {start}-{stop - 1})"
            blocks = set(range(start // part.block_rows, (stop - 1) // part.block_rows + 1))
            if not chunk_file(store.path, array, index).is_file():
                if block_done:
                    problems.append(f"{where}: missing, though its block is marked written")
                    bad_blocks |= blocks
                continue
            try:
                array[start:stop]
                checked += 1
            except (ValueError, RuntimeError) as err:
                problems.append(f"{where}: damaged ({str(err).splitlines()[0]})")
                bad_blocks |= blocks
    return problems, bad_blocks, checked


def verify_store(
    path: str | Path, repair: bool = False, progress: Progress = _no_progress
) -> tuple[FeatureStore, list[str], int]:
    """Problems found and chunks read. With `repair`, blocks holding a damaged or missing chunk are flagged
    unwritten and the store incomplete, so rerunning the same `kdpipe extract` recomputes exactly those blocks.
    `progress` wraps the per-chunk loops (the command line passes a progress bar)."""
    store = FeatureStore.open(path, mode="r+" if repair else "r")
    problems, checked = [], 0
    for part in store.splits():
        found, bad_blocks, count = verify_split(store, part, progress)
        problems += found
        checked += count
        if repair and bad_blocks:
            for block in sorted(bad_blocks):
                part.group[PROGRESS][block] = 0
            part.group.attrs["complete"] = False
            store.update_meta(complete=False)
    if store.complete and not all(part.complete for part in store.splits()):
        problems.append("store marked complete while a split is not")
    return store, problems, checked
