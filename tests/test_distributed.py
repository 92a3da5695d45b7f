"""Several processes under torchrun (gloo on the CPU): sharded extraction and DDP distillation against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, assert_one_line_error, load_script, run_cli
from pipeline.layout import STORE_NAME

pytestmark = pytest.mark.processes

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
    return len(load_script("soak").block_flags(store))


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


STUDENT_RUN = ["--student", "tv:squeezenet1_1", "--teacher-layers", "layer1.1", "--student-layers", "features.4"]
STUDENT_RUN += ["--batch-size", "64", "--device", "cpu"]  # squeezenet has no BatchNorm: the ranks' shares add up


def distill_args(store: Path, out: Path, *extra) -> list[str]:
    return ["distill", str(store), *STUDENT_RUN, "--out", str(out), *map(str, extra)]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "student.safetensors"))


@pytest.mark.slow
def test_two_ranks_train_the_weights_one_process_trains(one_process_store, tmp_path):
    run_cli(*distill_args(one_process_store, tmp_path / "one", "--steps", 8))
    result = torchrun(2, *distill_args(one_process_store, tmp_path / "two", "--steps", 8))
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name, value in one.items():  # the same 8 global batches; only the order of float sums differs
        assert (value - two[name]).abs().max() <= 1e-4 * value.abs().max(), name
    assert json.loads((tmp_path / "two" / "distill.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_two_ranks_killed_mid_run_resume_to_the_uninterrupted_weights(one_process_store, tmp_path):
    args = ("--epochs", 3, "--checkpoint-seconds", 0)
    whole = torchrun(2, *distill_args(one_process_store, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    cut = tmp_path / "cut"
    run = torchrun(2, *distill_args(one_process_store, cut, *args), wait=False)
    deadline = time.monotonic() + 300
    while not (cut / "epoch-001.state.pt").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert run.poll() is None and workers, "the run ended before a rank could be killed"
    os.kill(int(workers[0]), signal.SIGKILL)  # rank 0, which writes the checkpoints
    run.wait(timeout=120)
    assert run.returncode != 0 and not (cut / "student.safetensors").exists()
    resumed = torchrun(2, *distill_args(one_process_store, cut, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    first, second = weights(tmp_path / "whole"), weights(cut)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "block-kd"])
def test_baselines_train_on_two_ranks(one_process_store, tmp_path, method):
    student = ["--student", "resnet8", "--model-kwargs", "{base_width: 8}", "--batch-size", 64, "--device", "cpu"]
    args = ["distill", one_process_store, *student, "--method", method, "--steps", 4, "--out", tmp_path]
    result = torchrun(2, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "distill.json").read_text())["method"] == method


def test_a_batch_the_ranks_cannot_share_equally_is_refused(scored_store, tmp_path, monkeypatch):
    from pipeline.engine import distributed

    monkeypatch.setattr(distributed, "current", lambda: distributed.World(0, 3))  # as distill sees 3 ranks
    result = run_cli("distill", str(scored_store), "--batch-size", 64, "--out", tmp_path, expect_ok=False)
    assert_one_line_error(result, "--batch-size 64 is not divisible by the 3 processes")
