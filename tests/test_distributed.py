"""Several processes under torchrun (gloo on the CPU): sharded extraction and DDP distillation against one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, assert_one_line_error, load_script, run_cli
from pipeline.layout import STORE_NAME

TAPS = "layer1.0,layer1.1"  # 32 KiB a row: 128-row blocks, a dozen of them over the 1437 training images
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(nprocs: int, *args, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}"]
    command += ["-m", "pipeline.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def extract_args(teacher: dict, out: Path) -> list[str]:
    return ["extract", "--checkpoint", teacher["checkpoint"], "--layers", TAPS, "--device", "cpu", "--out", str(out)]


def files_equal(first: Path, second: Path) -> int:
    """Asserts the two stores' files are the same bytes, but the root's metadata (when and from where each was
    made); returns the number of files compared."""
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    names = [n for n in names if n != Path("zarr.json")]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs"
    return len(names)


def blocks_done(store: Path) -> int:
    flags = store / "train" / "progress" / "c"
    return sum(1 for _ in flags.rglob("*")) if flags.is_dir() else 0


@pytest.fixture(scope="module")
def one_process_store(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run_cli(*extract_args(digits_teacher, out))
    return out / STORE_NAME


@pytest.mark.slow
def test_two_ranks_extract_the_store_one_process_does_byte_for_byte(digits_teacher, one_process_store, tmp_path):
    result = torchrun(2, *extract_args(digits_teacher, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("store:") == 1  # rank 0 reports, once
    assert files_equal(one_process_store, tmp_path / STORE_NAME) > 12
    assert load_script("soak").zarr_bytes_equal(one_process_store, tmp_path / STORE_NAME) > 0


@pytest.mark.slow
def test_a_rank_killed_mid_run_resumes_with_one_process_byte_for_byte(digits_teacher, one_process_store, tmp_path):
    store = tmp_path / STORE_NAME
    run = torchrun(2, *extract_args(digits_teacher, tmp_path), wait=False)
    deadline = time.monotonic() + 300
    while blocks_done(store) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert run.poll() is None and workers, "the run ended before a rank could be killed"
    os.kill(int(workers[-1]), signal.SIGKILL)
    run.wait(timeout=120)
    assert run.returncode != 0 and 2 <= blocks_done(store) < 12
    run_cli(*extract_args(digits_teacher, tmp_path))  # one process finishes what the two began
    assert files_equal(one_process_store, store) > 12


def test_commands_of_one_process_refuse_torchrun(scored_store, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_one_line_error(run_cli("score", str(scored_store), expect_ok=False), "kdpipe score runs in one process")
    result = run_cli("extract", "--out", str(scored_store), expect_ok=False)
    assert_one_line_error(result, "WORLD_SIZE is set but", "start it with torchrun")
