"""Stores and run folders on object storage (`s3://...`), against a local S3 server (moto's) on 127.0.0.1.

Every stage that reads or writes a store or a run folder takes a URL: extract, score, distill (store and --out),
probe, verify and info; the numbers equal a local run's, an interrupted extract resumes to the same bytes, verify
finds a deleted chunk object, the lock object refuses a second writer and is taken over once its lease expires, and
no credential reaches what kdpipe writes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load

from cache.location import location
from cache.lock import LockError, _held, lock_output, store_lock
from cache.object_lock import Changed
from cache.schema import STORE_NAME
from cache.store import FeatureStore
from helpers import ROOT, STUDENT, assert_one_line_error, make_store, run_cli, small_chunks, weights
from pipeline import DistillConfig, ExtractConfig, ProbeConfig, ScoreConfig, distill, extract, probe, score
from pipeline.layout import STUDENT_WEIGHTS
from pipeline.stages.extract import HalfSlots

pytestmark = pytest.mark.s3

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

SECRET = "kdpipe-test-secret-7f3a9c"  # the dummy secret key: it must appear in nothing kdpipe writes
BUCKET = "kdpipe-test"
# Two blocks of 64 rows under small_chunks(CHUNK) (layer3.2 is 8 KiB a row), in batches of 32.
CHUNK = 1 << 19
SMALL = dict(splits=("train",), layers=("layer2.2", "layer3.2"), max_samples=128, device="cpu", batch_size=32)


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port), for the module."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Dummy credentials and the endpoint in the environment, as a user sets them; a fresh bucket; yields its URL."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "FSSPEC_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance metadata service for credentials
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    s3fs.S3FileSystem.clear_instance_cache()


def _arrays(store) -> dict[str, np.ndarray]:
    """Every array of a store (a local path or a URL), by path."""
    group = FeatureStore.open(store).group
    return {path: array[:] for path, array in group.arrays()} | {
        f"{split}/{path}": array[:] for split, sub in group.groups() for path, array in _walk(sub)
    }


def _walk(group):
    for name, array in group.arrays():
        yield name, array
    for name, sub in group.groups():
        for path, array in _walk(sub):
            yield f"{name}/{path}", array


def _objects(url: str) -> dict[str, bytes]:
    """Every object under a URL, by key."""
    fs = s3fs.S3FileSystem()
    return {key: fs.cat_file(key) for key in fs.find(url)}


def _assert_same_arrays(a, b) -> None:
    first, second = _arrays(a), _arrays(b)
    assert first.keys() == second.keys() and first
    for path in first:
        assert first[path].tobytes() == second[path].tobytes(), path


@pytest.fixture(scope="module")
def local_store(digits_teacher, tmp_path_factory):
    """The same small extract on the local disk, the reference."""
    out = tmp_path_factory.mktemp("local_run") / "extract"
    with small_chunks(CHUNK):
        extract(ExtractConfig(out=str(out), checkpoint=digits_teacher["checkpoint"], **SMALL))
    return out


@pytest.mark.slow
def test_round_trip_equals_a_local_run(s3, digits_teacher, local_store):
    """extract -> score -> distill -> probe with the store and the run folder on S3: the same arrays, Q and weights
    as the local run, every file of the run folder there, and the secret key in none of them."""
    local = local_store.parent
    local_scores = score(ScoreConfig(store=str(local_store), top_k=2, plot=False))
    local_distilled = distill(DistillConfig(store=str(local_store), out=str(local / "distill"), **STUDENT))
    url = f"{s3}/runs/extract"
    with small_chunks(CHUNK):
        summary = extract(ExtractConfig(out=url, checkpoint=digits_teacher["checkpoint"], **SMALL))
    assert summary["store"] == f"{url}/{STORE_NAME}" and summary["complete"]
    assert summary["splits"]["train"]["stored_bytes"] > 0
    _assert_same_arrays(local_store, url)
    scores = score(ScoreConfig(store=url, top_k=2, plot=False))
    assert [t["Q"] for t in scores["taps"]] == [t["Q"] for t in local_scores["taps"]]
    assert scores["scores_file"] == f"{url}/scores.json"
    distilled = distill(DistillConfig(store=url, out=f"{s3}/runs/distill", **STUDENT))
    assert distilled["store"] == f"{url}/{STORE_NAME}"
    timings = ("seconds", "images_per_second")
    assert {k: v for k, v in distilled["final"].items() if k not in timings} == {
        k: v for k, v in local_distilled["final"].items() if k not in timings
    }
    student = load(s3fs.S3FileSystem().cat_file(f"{BUCKET}/runs/distill/{STUDENT_WEIGHTS}"))
    reference = weights(local / "distill")
    assert student.keys() == reference.keys() and all(torch.equal(student[k], reference[k]) for k in student)
    probed = probe(ProbeConfig(run=f"{s3}/runs/distill", device="cpu"))
    local_probed = probe(ProbeConfig(run=str(local / "distill"), device="cpu"))  # the same weights, probed locally
    assert probed["test_top1"] == local_probed["test_top1"] and probed["weight_decay"] == local_probed["weight_decay"]
    objects = _objects(f"{s3}/runs")
    names = {key.rsplit("/", 1)[-1] for key in objects}
    expected = {"extract.json", "extract_args.yaml", "scores.json", "score_args.yaml", "distill.json"}
    assert expected | {"student.safetensors", "distill_args.yaml", "classifier.safetensors", "probe.json"} <= names
    assert not any(key.endswith((".lock", ".tmp")) for key in objects)  # locks released, no temporary objects
    assert not any(SECRET.encode() in data for data in objects.values())
    assert json.loads(objects[f"{BUCKET}/runs/extract/extract.json"])["store"] == f"{url}/{STORE_NAME}"


@pytest.mark.slow  # CI only, to keep `make test-fast` under a minute
def test_interrupted_extract_to_s3_resumes_to_the_same_bytes(s3, digits_teacher, local_store, monkeypatch):
    """An extract to S3 that dies mid-split leaves its written blocks flagged; the same command finishes it, every
    array byte-equal to an uninterrupted run's; info describes it, and verify finds a chunk object deleted from it."""
    url = f"{s3}/resumed"
    real_fill, calls = HalfSlots.fill, []

    def dying(self, features):
        calls.append(1)
        if len(calls) > 3:  # dies in the 4th batch, after the first block is written
            raise KeyboardInterrupt
        return real_fill(self, features)

    config = ExtractConfig(out=url, checkpoint=digits_teacher["checkpoint"], **SMALL)
    monkeypatch.setattr(HalfSlots, "fill", dying)
    with small_chunks(CHUNK), pytest.raises(KeyboardInterrupt):
        extract(config)
    part = FeatureStore.open(url).split("train")
    assert not FeatureStore.open(url).complete and 0 < len(part.missing_blocks()) < part.num_blocks
    assert not s3fs.S3FileSystem().exists(f"{BUCKET}/resumed/{STORE_NAME}.lock")  # released on the way out
    monkeypatch.setattr(HalfSlots, "fill", real_fill)
    with small_chunks(CHUNK):
        extract(config)
    _assert_same_arrays(local_store, url)
    text = run_cli("info", url).output
    assert f"store       {url}/{STORE_NAME}" in text and "complete    yes" in text and "features/layer3.2" in text
    assert "all checksums good" in run_cli("verify", url).output
    s3fs.S3FileSystem().rm_file(f"{BUCKET}/resumed/{STORE_NAME}/train/features/layer3.2/c/1/0/0/0")
    result = run_cli("verify", url, expect_ok=False)
    assert result.exit_code == 1
    assert_one_line_error(result, "train/features/layer3.2 chunk 1 (rows 64-127): missing, though its block is marked")


def test_a_second_writer_is_refused_while_the_lock_is_held(s3, monkeypatch):
    """The lock object refuses a second writer at once, naming the holder; released, it is taken again."""
    store = location(f"{s3}/held/{STORE_NAME}")
    rng = np.random.default_rng(0)
    make_store(store, {"a": rng.normal(size=(40, 4, 2, 2))}, np.arange(40) % 4)
    with lock_output(store, store_lock(store), "extract"):
        record = json.loads(s3fs.S3FileSystem().cat_file(f"{BUCKET}/held/{STORE_NAME}.lock"))
        assert record["pid"] == os.getpid() and record["command"] == "extract" and record["lease_seconds"] == 60
        with pytest.raises(LockError, match=rf"{store} is in use by PID {os.getpid()} on .* \(kdpipe extract\)"):
            with lock_output(store, store_lock(store), "score"):
                pass
        result = run_cli("score", f"{s3}/held", expect_ok=False)
    assert_one_line_error(result, f"{s3}/held/{STORE_NAME} is in use by PID {os.getpid()}", "kdpipe extract")
    with lock_output(store, store_lock(store), "score"):
        pass


@pytest.mark.slow  # CI only, to keep `make test-fast` under a minute
def test_a_stale_lock_is_taken_over_after_its_lease(s3, monkeypatch):
    """A holder that stops renewing (killed) keeps its output locked for one lease; then the next writer takes the
    lock over, and the old holder can no longer delete it. A live holder renews its lease and keeps its lock."""
    monkeypatch.setenv("KDPIPE_LOCK_LEASE", "1")
    stale, live = (location(f"{s3}/{name}/{STORE_NAME}") for name in ("stale", "live"))
    dead = _abandoned(lock_output(stale, store_lock(stale), "extract"))
    with lock_output(live, store_lock(live), "extract"):
        with pytest.raises(LockError, match="in use by"):
            with lock_output(stale, store_lock(stale), "extract"):
                pass
        time.sleep(2.1)  # the storage's clock counts whole seconds: stale from a lease and a second on
        with pytest.raises(LockError, match=r"in use by .* \(its lease of 1 s renewed [01] s ago\)"):
            with lock_output(live, store_lock(live), "score"):
                pass
        with lock_output(stale, store_lock(stale), "extract") as taken:
            assert json.loads(s3fs.S3FileSystem().cat_file(store_lock(stale).path))["token"] == taken._record["token"]
            with pytest.raises(Changed):  # the dead holder's late release deletes nothing
                dead._storage.delete(dead._etag)
            assert s3fs.S3FileSystem().exists(store_lock(stale).path)
    assert not s3fs.S3FileSystem().exists(store_lock(stale).path) and not s3fs.S3FileSystem().exists(
        store_lock(live).path
    )


def _abandoned(lock):
    """A lock taken, then left as a killed holder leaves it: not renewed, not released."""
    lock.__enter__()
    lock._stop.set()
    lock._renewer.join()
    _held.pop()
    return lock


@pytest.mark.slow
def test_a_killed_extract_to_s3_is_taken_over_and_resumed(s3, digits_teacher, local_store, monkeypatch):
    """`kdpipe extract --out s3://...` SIGKILLed mid-run: its lock is stale after the lease, the same command then
    takes it over and finishes the store, byte-equal to an uninterrupted run."""
    monkeypatch.setenv("KDPIPE_LOCK_LEASE", "2")
    url = f"{s3}/killed"
    args = ["extract", "--checkpoint", digits_teacher["checkpoint"], "--splits", "train", "--layers"]
    args += ["layer2.2,layer3.2", "--max-samples", 128, "--device", "cpu", "--batch-size", 8, "--out", url]
    script = (
        "import cache.store, sys; cache.store.MIN_CHUNK_BYTES = 1 << 19; from pipeline.cli import main;"
        " sys.argv[0] = 'kdpipe'; main()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env)
    fs = s3fs.S3FileSystem()
    progress = f"{BUCKET}/killed/{STORE_NAME}/train/progress/c/0"
    deadline = time.time() + 120
    while not fs.exists(progress) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fs.exists(f"{BUCKET}/killed/{STORE_NAME}.lock")  # nothing released it
    result = run_cli(*args, expect_ok=False)
    assert_one_line_error(result, "is in use by PID", "kdpipe extract")
    # stale from the lease and one second on, measured between two whole-second stamps of the storage's clock,
    # which can read up to a second short: 2 + 1 + 1 s after the last renewal (2.5 s after the refusal failed once)
    time.sleep(4.0)
    with small_chunks(CHUNK):
        run_cli(*args)
    _assert_same_arrays(local_store, url)


def test_object_storage_failures_are_one_line(s3, digits_teacher, monkeypatch, tmp_path):
    """No such bucket, no credentials, no server: one `Error:` line naming the URL, no traceback."""
    missing = "s3://no-such-bucket-kdpipe/x"
    assert_one_line_error(run_cli("info", missing, expect_ok=False), missing)
    extract_args = ["extract", "--checkpoint", digits_teacher["checkpoint"], "--splits", "train"]
    extract_args += ["--max-samples", 20, "--device", "cpu", "--out"]
    assert_one_line_error(run_cli(*extract_args, missing, expect_ok=False), missing)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    assert_one_line_error(run_cli(*extract_args, f"{s3}/refused", expect_ok=False), f"{s3}/refused")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    assert_one_line_error(run_cli("info", f"{s3}/x", expect_ok=False), f"{s3}/x")
