"""`kdpipe score` on dask.distributed (`--scheduler`, `--dask-workers`): the same numbers as the local run, and one
line for an unreachable scheduler or both options at once."""

from __future__ import annotations

import json
import shutil
import socket

import dask
import pytest
import torch
from dask.distributed import Client, LocalCluster
from threadpoolctl import threadpool_info

from helpers import assert_one_line_error, run_cli
from pipeline.engine.cluster import same_threads, thread_counts

pytestmark = pytest.mark.dask

NUMBERS = ("D", "S", "I", "E", "Q", "mu", "Delta", "R", "K", "d", "mean_entropy", "per_class")


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded workers in this process (threads, so nothing to spawn)."""
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as local,
        Client(local, set_as_default=False) as client,
    ):
        yield client


@pytest.fixture
def store(scored_store, tmp_path):
    """A copy of the session's scored store, with the local run's scores.json."""
    shutil.copytree(scored_store, tmp_path / "store")
    return tmp_path / "store"


def _numbers(path):
    summary = json.loads((path / "scores.json").read_text())
    return summary, [{k: t[k] for k in ("name", *NUMBERS)} for t in summary["taps"]]


@pytest.mark.parametrize("how", ["scheduler", "dask-workers"])
def test_same_scores_as_the_local_run(store, cluster, how):
    local, local_taps = _numbers(store)
    assert local["scheduler"]["kind"] == "local"
    args = ["--scheduler", cluster.scheduler.address] if how == "scheduler" else ["--dask-workers", 2]
    if how == "dask-workers":
        args.append("--no-dask-processes")
    run_cli("score", store, "--top-k", 2, "--no-plot", *args)
    spread, spread_taps = _numbers(store)
    assert spread_taps == local_taps  # bit for bit: the same code on the same rows
    assert spread["selected"] == local["selected"] and spread["subset_sizes"] == local["subset_sizes"]
    kind = {"kind": "distributed"} if how == "scheduler" else {"kind": "local-cluster", "processes": False}
    assert spread["scheduler"] == {**kind, "workers": 2, "threads": local["scheduler"]["threads"]}


@pytest.mark.slow
def test_worker_processes_give_the_same_scores(store):
    """Spawned workers start on one thread (OMP_NUM_THREADS=1); the tasks take the client's counts."""
    _, local_taps = _numbers(store)
    run_cli("score", store, "--top-k", 2, "--no-plot", "--dask-workers", 2)
    spread, spread_taps = _numbers(store)
    assert spread_taps == local_taps and spread["scheduler"]["processes"] is True


def test_same_threads_sets_and_restores_the_counts():
    before = thread_counts()
    wanted = {"torch": before["torch"] + 1, "blas": before["blas"] + 1}
    with same_threads(wanted):
        assert torch.get_num_threads() == wanted["torch"]
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {wanted["blas"]}
    assert thread_counts() == before


def test_unreachable_scheduler_is_one_line(store):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = run_cli("score", store, "--scheduler", address, expect_ok=False)
    assert_one_line_error(result, f"cannot reach the dask scheduler at {address}")


def test_scheduler_and_workers_exclude_each_other(store):
    before = (store / "scores.json").read_bytes()
    result = run_cli("score", store, "--scheduler", "tcp://127.0.0.1:8786", "--dask-workers", 2, expect_ok=False)
    assert_one_line_error(result, "--scheduler and --dask-workers exclude each other")
    assert (store / "scores.json").read_bytes() == before
