"""Background, chunk-aligned writing of one split.

The producer (the teacher loop) puts batches of rows; a writer thread copies them into per-array chunk buffers,
writes each chunk as soon as it is full (compression happens there, overlapping the next forward pass) and
flags a block done once every array has written all of that block's chunks. Rows arrive in the order of the
pending blocks, so a resumed run simply feeds the missing blocks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping

import numpy as np

from .errors import StoreError
from .store import SplitStore, first_non_finite_row

WRITE_BYTES = 8 << 20  # rows gathered per array before one write call


def region_rows(chunk_rows: int, row_bytes: int, block_rows: int) -> int:
    """Rows written per call: whole chunks, doubling up to WRITE_BYTES, never beyond the block (so regions stay
    chunk-aligned and divide the block). One call for several chunks lets zarr encode them concurrently; one
    call per chunk costs a fixed overhead that dominated writing."""
    rows = chunk_rows
    while rows * 2 <= block_rows and rows * 2 * row_bytes <= WRITE_BYTES:
        rows *= 2
    return rows


class _ChunkBuffer:
    """Collects one array's rows until its current region (`chunk_rows` rows: one or more whole chunks) is
    complete, then writes that region in one call."""

    def __init__(self, array, chunk_rows: int) -> None:
        # Skips zarr's per-chunk "all fill value?" scan (half of zarr's write cost): every chunk written holds
        # real rows. A runtime setting, not stored: an array opened again has zarr's default, so it is set here.
        self.array = array.with_config({"write_empty_chunks": True})
        self.chunk_rows = chunk_rows
        self.num_rows = array.shape[0]
        self.buffer = np.empty((chunk_rows, *array.shape[1:]), dtype=array.dtype)
        self.chunk_start = -1
        self.filled_until = -1
        self.written_until = 0  # every row below this is on disk (within the rows fed so far)

    def add(self, start: int, rows: np.ndarray) -> None:
        """Adds rows for store positions [start, start + len(rows)); they never straddle a block gap."""
        if rows.dtype.kind == "f":
            _check_finite(self.array.path, start, rows)
        offset = 0
        while offset < len(rows):
            row = start + offset
            if row >= self.chunk_start + self.chunk_rows or self.chunk_start < 0:
                self.chunk_start = row - row % self.chunk_rows
                self.filled_until = self.chunk_start
            if row != self.filled_until:
                raise RuntimeError(f"rows for {self.array.path} arrived out of order ({row} != {self.filled_until})")
            chunk_end = min(self.chunk_start + self.chunk_rows, self.num_rows)
            take = min(len(rows) - offset, chunk_end - row)
            self.buffer[row - self.chunk_start : row - self.chunk_start + take] = rows[offset : offset + take]
            self.filled_until = row + take
            offset += take
            if self.filled_until == chunk_end:
                self.array[self.chunk_start : chunk_end] = self.buffer[: chunk_end - self.chunk_start]
                self.written_until = chunk_end


def _check_finite(path: str, start: int, rows: np.ndarray) -> None:
    """NaN or an infinity (for float16 features, also any |x| > 65504, which overflowed) is refused, naming the
    array and row, so the store never holds one: `kdpipe verify` counts one as damage."""
    row = first_non_finite_row(rows)
    if row is not None:
        what = "NaN, or |x| > 65504" if rows.dtype == np.float16 else "NaN or infinite"
        raise StoreError(f"{path} is not finite in {rows.dtype} at store row {start + row} ({what})")


class SplitWriter:
    """Writes the pending blocks of a split from a stream of batches, on a background thread.

    with SplitWriter(split, blocks) as writer:
        for batch in batches:           # dict: array path -> rows, in the order of `blocks`
            writer.put(batch)
    Leaving the `with` block normally waits for the last chunk; an exception abandons the queue, leaving the
    blocks already flagged done (and only those) for a resume.
    """

    def __init__(self, split: SplitStore, blocks: list[int], queue_size: int = 4) -> None:
        self.split = split
        self.blocks = list(blocks)
        arrays = split.arrays()
        self._buffers = {
            path: _ChunkBuffer(arr, region_rows(arr.chunks[0], arr.nbytes // max(arr.shape[0], 1), split.block_rows))
            for path, arr in arrays.items()
        }
        self._slots = [split.block_range(b) for b in self.blocks]
        self._slot, self._slot_offset = 0, 0
        self._next_block = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdpipe-writer", daemon=True)

    def __enter__(self) -> SplitWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None if exc_type is None else _ABORT)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
        if exc_type is None and self._next_block < len(self.blocks):
            raise RuntimeError(f"stream ended with {len(self.blocks) - self._next_block} blocks unwritten")

    def put(self, batch: Mapping[str, np.ndarray], on_written: Callable[[], None] | None = None) -> None:
        """Queues a batch (blocks while the writer is `queue_size` batches behind); `on_written` is called once
        its rows are copied out, so the producer may reuse the batch's buffers."""
        if self._error is not None:
            raise self._error
        self._queue.put((batch, on_written))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or item is _ABORT:
                return
            batch, on_written = item
            if self._error is None:  # after an error, drain so the producer never blocks on a dead writer
                try:
                    self._write(batch)
                except OSError as err:  # disk full, permissions, ...: the store stays incomplete and resumable
                    self._error = StoreError(
                        f"cannot write {self.split.path}: {err.strerror or err}; the store is left incomplete and "
                        "resumes with the same command"
                    )
                except BaseException as err:  # re-raised in the producer's thread
                    self._error = err
            if on_written is not None:
                on_written()

    def _write(self, batch: Mapping[str, np.ndarray]) -> None:
        count = len(next(iter(batch.values())))
        offset = 0
        while offset < count:
            start, stop = self._slots[self._slot]
            row = start + self._slot_offset
            take = min(count - offset, stop - row)
            for path, buffer in self._buffers.items():
                buffer.add(row, batch[path][offset : offset + take])
            offset += take
            self._slot_offset += take
            if row + take == stop:
                self._slot, self._slot_offset = self._slot + 1, 0
            self._flag_finished_blocks()

    def _flag_finished_blocks(self) -> None:
        while self._next_block < len(self.blocks):
            block = self.blocks[self._next_block]
            stop = self.split.block_range(block)[1]
            if any(b.written_until < stop for b in self._buffers.values()):
                return
            self.split.mark_block_done(block)
            self._next_block += 1


_ABORT = object()
