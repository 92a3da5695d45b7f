"""Whole-store integrity check: every chunk of a block flagged written (in every view) is there, decodes (crc32c) and
holds finite floats, every split is there and readable, and the completion flags agree with each other. Chunks of
blocks not yet written are not read: the next `kdpipe extract` writes them whole.

The verdict is one of three, the exit status of `kdpipe verify`: SOUND (0), DAMAGED (1: a bad checksum, a non-finite
value, a chunk missing from a block flagged written, unreadable metadata, a split missing from a store marked
complete) or INCOMPLETE (2: sound so far, with blocks or splits still to write; the same kdpipe extract resumes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .lock import lock_output, store_lock
from .store import PROGRESS, FeatureStore, SplitStore

SOUND, DAMAGED, INCOMPLETE = 0, 1, 2


@dataclass
class Verdict:
    store: FeatureStore
    problems: list[str]  # each damaged or missing chunk, array or split
    checked: int = 0  # chunks read

    @property
    def status(self) -> int:
        return DAMAGED if self.problems else SOUND if self.store.complete else INCOMPLETE


def chunk_file(store_path: Path, array, index: int) -> Path:
    """The file (or object) of chunk `index` along the sample axis (default v3 key encoding: c/<i>/0/...)."""
    return store_path / array.path / "/".join(["c", str(index), *["0"] * (array.ndim - 1)])


Progress = Callable[..., Iterable]  # tqdm-like: progress(iterable, desc=...) yields the items


def _no_progress(items: Iterable, **_) -> Iterable:
    return items


def verify_split(
    store: FeatureStore, part: SplitStore, progress: Progress = _no_progress
) -> tuple[list[str], set[int], int]:
    """Problems found in one split, the blocks they touch, and the number of chunks read; metadata kdpipe did not
    create (`SplitStore.check_layout`) is a DamagedStoreError before any chunk is read."""
    part.check_layout(store.identity)
    problems, bad_blocks, checked = [], set(), 0
    done = set(range(part.num_blocks)) - set(part.missing_blocks())
    if part.complete and len(done) < part.num_blocks:
        problems.append(f"{part.name}: marked complete with {part.num_blocks - len(done)} blocks unwritten")
    for path, array in part.arrays().items():
        rows = array.chunks[0]
        for index in progress(range(math.ceil(array.shape[0] / rows)), desc=f"verify {part.name}/{path}", leave=False):
            start, stop = index * rows, min((index + 1) * rows, array.shape[0])
            blocks = set(range(start // part.block_rows, (stop - 1) // part.block_rows + 1))
            where = f"{part.name}/{path} chunk {index} (rows {start}-{stop - 1})"
            if not blocks <= done:  # unwritten: the next extract writes it whole, whatever is there now
                continue
            if not chunk_file(store.path, array, index).is_file():
                problems.append(f"{where}: missing, though its block is marked written")
                bad_blocks |= blocks
                continue
            try:
                values = array[start:stop]
                checked += 1
            except (ValueError, RuntimeError) as err:
                problems.append(f"{where}: damaged ({str(err).splitlines()[0]})")
                bad_blocks |= blocks
                continue
            bad = part.first_bad_row(path, values)
            if bad is not None:
                problems.append(f"{where}: {bad[1]} at row {start + bad[0]}")
                bad_blocks |= blocks
    return problems, bad_blocks, checked


def verify_store(path: str | Path, repair: bool = False, progress: Progress = _no_progress) -> Verdict:
    """Reads the whole store. With `repair` (under the store's lock), blocks holding a damaged or missing chunk are
    flagged unwritten and the store incomplete, so rerunning the same `kdpipe extract` recomputes exactly those
    blocks (and writes a damaged or missing split again). `progress` wraps the per-chunk loops."""
    path = FeatureStore.locate(path)
    with lock_output(path, store_lock(path), "verify") if repair else nullcontext():
        store = FeatureStore.open(path, mode="r+" if repair else "r")
        verdict = Verdict(store, [])
        for name in store.expected_splits():
            _verify_split(verdict, name, repair, progress)
        if repair and verdict.problems:
            store.update_meta(complete=False)
    return verdict


def _verify_split(verdict: Verdict, name: str, repair: bool, progress: Progress) -> None:
    """Adds one split's problems to the verdict (and with `repair`, flags its bad blocks unwritten)."""
    store = verdict.store
    try:
        part = store.split(name) if store.split_created(name) else None
    except StoreError as err:
        verdict.problems.append(f"{name}: {err}")
        return
    if part is None:  # not written yet
        if store.complete:
            verdict.problems.append(f"{name}: missing from the store, though it is marked complete")
        return
    if store.complete and not part.complete:
        verdict.problems.append(f"{name}: not marked complete, though the store is")
    try:
        views = part.views()
    except StoreError as err:  # a view's metadata
        verdict.problems.append(f"{name}: {err}")
        return
    for view in views:  # view 0 is the split itself
        try:
            found, bad_blocks, count = verify_split(store, view, progress)
        except StoreError as err:  # an array's metadata
            verdict.problems.append(f"{view.name}: {err}")
            continue
        verdict.problems += found
        verdict.checked += count
        if repair and bad_blocks:
            # incomplete first: a kill between these writes leaves a store that says it is incomplete, never one
            # marked complete with blocks flagged unwritten
            store.update_meta(complete=False)
            part.mark_incomplete()
            for block in sorted(bad_blocks):
                view.array(PROGRESS)[block] = 0
