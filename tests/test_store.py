"""The store's chunk plan and the background writer, on small synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from cache import store
from cache.errors import StoreError
from cache.store import (
    MIN_CHUNK_BYTES,
    ArraySpec,
    FeatureStore,
    chunk_rows,
    first_non_finite_row,
    plan_chunks,
)
from cache.writer import SplitWriter
from helpers import small_chunks as smaller_chunks


def test_chunks_hold_four_mebibytes_and_divide_the_block():
    assert chunk_rows(MIN_CHUNK_BYTES) == 1 and chunk_rows(MIN_CHUNK_BYTES // 3) == 4 and chunk_rows(8) == 4096
    specs = [
        ArraySpec("a", (16, 32, 32), "float16"),
        ArraySpec("b", (2048,), "float16"),
        ArraySpec("c", (), "int64", sets_block=False),
    ]
    rows, block = plan_chunks(specs, 100_000)
    assert rows["a"] * 32 * 1024 >= MIN_CHUNK_BYTES
    assert all(block % r == 0 for r in rows.values())
    assert block == rows["b"] == rows["c"] == 1024  # the narrow label array follows the features' block
    rows, block = plan_chunks(specs, 100)
    assert block == 100 and max(rows.values()) == 100


@pytest.fixture
def small_chunks():
    with smaller_chunks():
        yield


def _store(tmp_path, n: int, specs):
    store = FeatureStore.create(tmp_path / "s.zarr", {"identity": {}})
    return store, store.create_split("train", n, specs, taps=["x"], attrs={})


def _stream(part, blocks, data, batch):
    """Feeds rows of the pending blocks, in order, in batches of `batch`."""
    rows = np.concatenate([np.arange(*part.block_range(b)) for b in blocks])
    with SplitWriter(part, blocks) as writer:
        for start in range(0, len(rows), batch):
            idx = rows[start : start + batch]
            writer.put({name: values[idx] for name, values in data.items()})


# batches of one row and of more than the whole store: CI only, to keep `make test-fast` under a minute
@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(1, marks=pytest.mark.slow),
        pytest.param(7, marks=pytest.mark.slow),
        300,
        pytest.param(2000, marks=pytest.mark.slow),
    ],
)
def test_writer_round_trip_any_batch_size(tmp_path, batch, small_chunks):
    specs = [ArraySpec("features/big", (256, 8, 8), "float16"), ArraySpec("features/mid", (32, 32), "float16")]
    n = 1300
    rng = np.random.default_rng(0)
    data = {path: rng.standard_normal((n, *s.shape)).astype(np.float16) for path, s in [(s.path, s) for s in specs]}
    store, part = _store(tmp_path, n, specs)
    assert (part.array("features/big").chunks[0], part.block_rows, part.num_blocks) == (32, 512, 3)
    _stream(part, list(range(part.num_blocks)), data, batch)
    assert part.missing_blocks() == []
    for name, values in data.items():
        np.testing.assert_array_equal(part.array(name)[:], values)
    part.mark_complete()
    store.mark_complete()
    assert FeatureStore.open(store.path).complete


def test_writer_fills_only_missing_blocks(tmp_path, small_chunks):
    n = 100
    big = np.zeros((n, 512, 8, 8), np.float16)
    big[:, 0, 0, 0] = np.arange(1, n + 1)  # row ids, exact in float16
    store, part = _store(tmp_path, n, [ArraySpec("features/big", (512, 8, 8), "float16")])
    assert part.num_blocks == 7
    pending = [1, 6]
    _stream(part, pending, {"features/big": big}, batch=5)
    assert part.missing_blocks() == [0, 2, 3, 4, 5]
    ids = part.array("features/big")[:, 0, 0, 0]
    for b in range(part.num_blocks):
        start, stop = part.block_range(b)
        expected = np.arange(start + 1, stop + 1) if b in pending else np.full(stop - start, np.nan)  # unwritten
        np.testing.assert_array_equal(ids[start:stop], expected)
    with pytest.raises(StoreError, match="unwritten blocks"):
        part.mark_complete()


def test_writer_skips_zarrs_fill_value_scan_on_a_reopened_store(tmp_path, monkeypatch):
    """zarr scans every chunk written for "all fill value?" unless told not to (half of its write cost), and that
    switch is a runtime setting an array opened again does not keep; extract writes into a reopened store."""
    from zarr.core.buffer.core import NDBuffer

    values = np.arange(64 * 8, dtype=np.float16).reshape(64, 8)
    store, _ = _store(tmp_path, 64, [ArraySpec("features/x", (8,), "float16")])
    part = FeatureStore.open(store.path, mode="r+").split("train")
    scanned = []
    monkeypatch.setattr(NDBuffer, "all_equal", lambda chunk, *args, **kwargs: scanned.append(chunk.shape) or False)
    _stream(part, [0], {"features/x": values}, batch=16)
    assert set(scanned) <= {(1,)}  # only the one-byte block flag, not the features' chunk
    np.testing.assert_array_equal(part.array("features/x")[:], values)


def test_writer_failure_leaves_block_pending(tmp_path):
    specs = [ArraySpec("labels", (), "int64")]
    store, part = _store(tmp_path, 10, specs)
    with pytest.raises(RuntimeError, match="boom"):
        with SplitWriter(part, [0]) as writer:
            writer.put({"labels": np.arange(5)})
            raise RuntimeError("boom")
    assert part.missing_blocks() == [0] and not part.complete


def test_open_rejects_foreign_and_newer_stores(tmp_path):
    import zarr

    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a kdpipe feature store"):
        FeatureStore.open(tmp_path / "plain.zarr")
    store = FeatureStore.create(tmp_path / "new.zarr", {})
    store.update_meta(format_version=99)
    with pytest.raises(StoreError, match="newer than this kdpipe reads"):
        FeatureStore.open(tmp_path / "new.zarr")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a Zarr store; refusing"):
        FeatureStore.create(tmp_path / "dir", {}, overwrite=True)
    assert (tmp_path / "dir" / "notes.txt").read_text() == "mine"


def test_writer_refuses_float16_overflow(tmp_path):
    store, part = _store(tmp_path, 10, [ArraySpec("features/x", (3,), "float16")])
    values = np.zeros((10, 3), np.float16)
    values[7, 1] = np.float16(np.inf)
    with pytest.raises(StoreError, match=r"features/x is not finite in float16 at store row 7"):
        with SplitWriter(part, [0]) as writer:
            writer.put({"features/x": values})
    assert part.missing_blocks() == [0]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bad_row", [None, 0, 5, 6, 29])
def test_first_non_finite_row_checked_block_by_block_finds_what_a_whole_array_check_finds(monkeypatch, dtype, bad_row):
    rows = np.random.default_rng(0).normal(size=(30, 4, 3)).astype(dtype)
    if bad_row is not None:
        rows[bad_row, 2, 1] = np.inf if bad_row % 2 else np.nan
    naive = [i for i in range(len(rows)) if not np.isfinite(rows[i]).all()]
    monkeypatch.setattr(store, "FINITE_CHECK_BYTES", rows[:6].nbytes)  # blocks of 6 rows: 5 blocks
    assert first_non_finite_row(rows) == (naive[0] if naive else None)
    monkeypatch.setattr(store, "FINITE_CHECK_BYTES", 1)  # one row a block
    assert first_non_finite_row(rows) == (naive[0] if naive else None)


def test_overwrite_deletes_only_a_store_kdpipe_wrote(tmp_path):
    """Another tool's Zarr group is refused, not deleted; a store kdpipe wrote, or a damaged one (its root
    metadata unreadable), is replaced."""
    import zarr

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w", attributes={"tool": "other"}).create_array("x", shape=(4,), dtype="f4")
    before = sorted(p.relative_to(foreign) for p in foreign.rglob("*"))
    with pytest.raises(StoreError, match="a Zarr group kdpipe did not write; refusing to delete it"):
        FeatureStore.create(foreign, {"identity": {}}, overwrite=True)
    assert sorted(p.relative_to(foreign) for p in foreign.rglob("*")) == before
    ours = FeatureStore.create(tmp_path / "ours.zarr", {"identity": {"v": 1}})
    assert FeatureStore.create(ours.path, {"identity": {"v": 2}}, overwrite=True).meta["identity"] == {"v": 2}
    (ours.path / "zarr.json").write_text("{not json")  # damaged: extract --overwrite rebuilds it
    assert FeatureStore.create(ours.path, {"identity": {"v": 3}}, overwrite=True).meta["identity"] == {"v": 3}
