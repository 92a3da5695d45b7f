"""Crash safety (SIGKILL + resume), integrity (verify, damaged chunks), write failures."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache.store import STORE_NAME, FeatureStore
from helpers import assert_one_line_error, load_script, run_cli
from pipeline import ExtractConfig, extract


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(digits_teacher, tmp_path):
    soak = load_script("soak")
    rng = random.Random(1)
    killed, compared = soak.soak_teach(tmp_path, kills=2, rng=rng)
    assert killed >= 1 and compared > 0
    killed, compared = soak.soak_extract(tmp_path, digits_teacher["checkpoint"], kills=2, rng=rng)
    assert killed >= 1 and compared > 10 * 2**20
    killed, compared = soak.soak_distill(tmp_path, kills=2, rng=rng)
    assert killed >= 1 and compared > 0


@pytest.fixture
def store(digits_teacher, tmp_path):
    config = ExtractConfig(
        out=str(tmp_path), checkpoint=digits_teacher["checkpoint"], layers=("layer3.2",), splits=("test",), device="cpu"
    )
    extract(config)
    return tmp_path


def _extract_test_split(checkpoint: str, out: Path) -> list:
    """The command line the `store` fixture's contents come from."""
    return [
        "extract",
        "--teacher",
        "resnet20",
        "--checkpoint",
        checkpoint,
        "--layers",
        "layer3.2",
        "--splits",
        "test",
        "--device",
        "cpu",
        "--out",
        out,
    ]


def _a_chunk(store: Path) -> Path:
    return store / STORE_NAME / "test" / "features" / "layer3.2" / "c" / "0" / "0" / "0" / "0"


def test_verify_reports_damaged_and_missing_chunks(digits_teacher, store):
    assert "all checksums good; store complete" in run_cli("verify", store).output
    chunk = _a_chunk(store)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = run_cli("verify", store, expect_ok=False)
    assert "test/features/layer3.2 chunk 0 (rows 0-359): damaged" in result.output
    assert_one_line_error(run_cli("score", store, "--split", "test", expect_ok=False), "features/layer3.2", "damaged")
    chunk.unlink()
    assert "missing, though its block is marked written" in run_cli("verify", store, expect_ok=False).output
    assert_one_line_error(run_cli("verify", store, "--repair", expect_ok=False), "rerun the same kdpipe extract")
    assert not FeatureStore.open(store).complete
    run_cli(*_extract_test_split(digits_teacher["checkpoint"], store))
    assert "all checksums good; store complete" in run_cli("verify", store).output


def test_failing_write_leaves_the_store_incomplete_and_resumable(digits_teacher, store, tmp_path, monkeypatch):
    calls = []
    real_setitem = zarr.Array.__setitem__

    def disk_full(self, key, value):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", disk_full)
    args = _extract_test_split(digits_teacher["checkpoint"], tmp_path / "full")
    assert_one_line_error(run_cli(*args, expect_ok=False), "No space left on device", "resumes")
    assert not FeatureStore.open(tmp_path / "full").complete
    assert not (tmp_path / "full" / "extract.json").exists()
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)
    run_cli(*args)
    resumed = zarr.open_group(str(tmp_path / "full" / STORE_NAME))["test/features/layer3.2"][:]
    reference = zarr.open_group(str(store / STORE_NAME))["test/features/layer3.2"][:]
    assert np.array_equal(resumed, reference)
