"""Crash safety (SIGKILL + resume), integrity (verify, damaged chunks), write failures."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache.lock import OutputLock, _Removed, store_lock
from cache.schema import STORE_NAME
from cache.store import FeatureStore
from cache.verify import DAMAGED, INCOMPLETE, SOUND, verify_store
from helpers import (
    ROOT,
    STUDENT,
    assert_one_line_error,
    kdpipe_process,
    load_script,
    locked_elsewhere,
    make_store,
    run_cli,
    tree_bytes,
)
from pipeline import DistillConfig, ProbeConfig, distill, probe
from pipeline.layout import EXTRACT_SUMMARY, PROBE_SUMMARY, STUDENT_WEIGHTS, folder_lock, score_files


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(digits_teacher, tmp_path):
    soak = load_script("soak")
    rng = random.Random(1)
    killed, compared = soak.soak_teach(tmp_path, kills=2, rng=rng)
    assert killed >= 1 and compared > 0
    landed, compared = soak.soak_extract(tmp_path, digits_teacher["checkpoint"], kills=2, rng=rng)
    assert any(landing.in_augmented_view for landing in landed), [str(landing) for landing in landed]
    assert compared > 10 * 2**20
    epochs, compared = soak.soak_distill(tmp_path, kills=2, rng=rng)
    assert epochs and 1 <= epochs[0] < 8 and compared > 0  # the first kill left epochs to resume


@pytest.fixture(scope="module")
def extracted(digits_teacher, tmp_path_factory):
    """The test split's layer3.2, extracted once: tests take copies (`store`), or compare what they recover with it."""
    out = tmp_path_factory.mktemp("extracted")
    run_cli(*_extract_test_split(digits_teacher["checkpoint"], out))
    return out


@pytest.fixture
def store(extracted, tmp_path):
    """An extract output folder of its own (a copy) in `tmp_path`, for a test to damage or extract into."""
    shutil.copytree(extracted, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _extract_test_split(checkpoint: str, out: Path) -> list:
    """The command line the `extracted` fixture's contents come from."""
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
    assert "all values sound; store complete" in run_cli("verify", store).output
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
    assert "all values sound; store complete" in run_cli("verify", store).output


def test_failing_write_leaves_the_store_incomplete_and_resumable(digits_teacher, extracted, tmp_path, monkeypatch):
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
    unfinished = _a_chunk(tmp_path / "full").with_suffix(".0123abcd.partial")  # what a SIGKILL mid-write leaves
    unfinished.write_bytes(b"half a chunk")
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)
    run_cli(*args)
    resumed, reference = (_store_files(out / STORE_NAME) for out in (tmp_path / "full", extracted))
    assert resumed.keys() == reference.keys() and resumed == reference  # the unfinished write is gone


def _store_files(path: Path) -> dict[str, bytes]:
    """A store's files by relative path, but the root metadata (when and from where it was made)."""
    return {name[len(str(path)) :]: data for name, data in tree_bytes(path).items() if name != str(path / "zarr.json")}


# ---------------------------------------------------------------------------------------------------------------
# One writer per output


def test_a_second_writer_fails_at_once_and_changes_nothing(digits_teacher, scored_store, store, tmp_path):
    """Each writing command on an output another process holds: one line naming the holder, not a byte changed;
    read-only commands run as usual. Once the holder is SIGKILLed, its lock is taken over."""
    teacher, run, report = tmp_path / "teacher", tmp_path / "run", tmp_path / "report"
    shutil.copytree(Path(digits_teacher["checkpoint"]).parent, teacher)
    run.mkdir()
    (run / STUDENT_WEIGHTS).write_bytes(b"never read: the lock comes first")
    features = store / STORE_NAME
    other_taps = _extract_test_split(digits_teacher["checkpoint"], store)
    other_taps[other_taps.index("layer3.2")] = "layer2.2"
    student = ["--student", "resnet8", "--model-kwargs", "{base_width: 8}", "--device", "cpu"]
    writers = {
        features: [[*other_taps, "--overwrite"], ["score", store, "--split", "test"], ["verify", store, "--repair"]],
        teacher: [["teach", "--out", teacher, "--overwrite", "--epochs", 1, "--device", "cpu"]],
        run: [["distill", scored_store, "--out", run, *student], ["probe", run, "--device", "cpu"]],
        report: [["report", "--store", scored_store, "--out", report, "--methods", "ce", "--seeds", 0]],
    }
    locks = [(features, store_lock(features)), *((folder, folder_lock(folder)) for folder in (teacher, run, report))]
    with locked_elsewhere("extract", *locks) as holder:
        before = tree_bytes(tmp_path)
        for output, commands in writers.items():
            for args in commands:
                in_use = f"{output} is in use by PID {holder.pid} on {socket.gethostname()} (kdpipe extract) since 20"
                assert_one_line_error(run_cli(*args, expect_ok=False), in_use)
        assert "store complete" in run_cli("verify", store).output
        assert "complete    yes" in run_cli("info", store).output
        run_cli("summary", tmp_path)
        assert tree_bytes(tmp_path) == before
    assert json.loads(store_lock(features).read_text())["pid"] == holder.pid  # left by the killed holder
    run_cli("score", store, "--split", "test", "--no-plot")
    assert not store_lock(features).exists()  # the record goes with the hold, and the file with it


def test_finished_outputs_hold_no_lock_file(digits_teacher, scored_store, tmp_path):
    """Teach, extract, score, distill and probe each remove their lock file as they release it."""
    run = tmp_path / "run"
    distill(DistillConfig(store=str(scored_store), out=str(run), **{**STUDENT, "epochs": 1}))
    probe(ProbeConfig(run=str(run), max_iter=5))
    folders = [Path(digits_teacher["checkpoint"]).parent, scored_store, run]
    assert (run / PROBE_SUMMARY).is_file()
    assert [p for folder in folders for p in folder.rglob("*.lock")] == []


TAKE_IN_TURN = """
import os, sys, time
from cache.lock import LockError, OutputLock
output, marker, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
held = overlaps = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with OutputLock(output, output + ".lock", "test"):
            try:  # exclusive creation fails while another holder is inside
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                overlaps += 1
                continue
            held += 1
            os.unlink(marker)
    except LockError:
        pass
print(held, overlaps)
"""


def test_processes_taking_a_lock_in_turn_never_hold_it_together(tmp_path):
    """Three processes take and release one output's lock as fast as they can, its file removed at every release:
    each takes it many times, never two at once, and no lock file is left."""
    output, marker = tmp_path / "out", tmp_path / "inside"
    script = [sys.executable, "-c", TAKE_IN_TURN, str(output), str(marker), "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    takers = [subprocess.Popen(script, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    counts = [tuple(map(int, p.communicate(timeout=60)[0].split())) for p in takers]
    assert all(held > 10 for held, _ in counts), counts
    assert all(overlaps == 0 for _, overlaps in counts), counts
    assert not Path(f"{output}.lock").exists()


def test_a_lock_won_on_a_removed_file_is_refused(tmp_path):
    """The case the removal at release must not break: a writer that opened the lock file before its holder removed
    it, and won the flock after, holds a file nobody else can see. Its record is refused and the next try takes
    the lock file now at the path."""
    lock_file = tmp_path / "out.lock"
    lock_file.touch()
    stale = os.open(lock_file, os.O_RDWR)
    lock_file.unlink()
    lock_file.touch()  # a later writer's file, at the same path
    taker = OutputLock(tmp_path / "out", lock_file, "test")
    with pytest.raises(_Removed):
        taker._write_record(stale)
    os.close(stale)
    with taker:
        assert json.loads(lock_file.read_text())["command"] == "test"
    assert not lock_file.exists()


@pytest.mark.slow  # two teacher processes racing: CI only, to keep `make test-fast` under a minute
def test_two_extracts_at_once_one_writes_the_store(digits_teacher, tmp_path):
    """Started together on one output: exactly one runs, the other exits at once with one line naming it, and the
    store verifies and reopens."""
    args = ["extract", "--checkpoint", digits_teacher["checkpoint"], "--splits", "test", "--device", "cpu"]
    both = [kdpipe_process(*args, "--out", tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    outputs = [p.communicate(timeout=300) for p in both]
    codes = [p.returncode for p in both]
    assert sorted(codes) == [0, 1], outputs
    winner, (_, lost) = both[codes.index(0)], outputs[codes.index(1)]
    errors = [line for line in lost.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in lost, lost
    assert errors[0].startswith(f"Error: {tmp_path / STORE_NAME} is in use by PID {winner.pid} on "), errors
    assert "store complete" in run_cli("verify", tmp_path).output
    assert FeatureStore.open(tmp_path).complete


# ---------------------------------------------------------------------------------------------------------------
# Recovery from damaged or missing metadata


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:25])


# damage, what info and verify name, and whether a rerun recovers (else --overwrite must)
DAMAGE = {
    "root metadata truncated": (lambda s: _truncate(s / "zarr.json"), "features.zarr/zarr.json is unreadable", False),
    "root metadata deleted": (
        lambda s: (s / "zarr.json").unlink(),
        "zarr.json, the store's root metadata, is missing",
        False,
    ),
    "split metadata truncated": (lambda s: _truncate(s / "test" / "zarr.json"), "test/zarr.json is unreadable", True),
    "array metadata truncated": (
        lambda s: _truncate(s / "test" / "labels" / "zarr.json"),
        "test/labels/zarr.json is unreadable",
        True,
    ),
    "split deleted": (lambda s: shutil.rmtree(s / "test"), "test: missing from the store", True),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_metadata_is_one_line_and_extract_recovers(digits_teacher, extracted, tmp_path, case):
    damage, named, rerun_recovers = DAMAGE[case]
    out = tmp_path / "out"
    shutil.copytree(extracted, out)
    damage(out / STORE_NAME)
    info = run_cli("info", out, expect_ok=case == "split deleted")
    if case == "split deleted":
        assert "split test: not written (rerun the same kdpipe extract)" in info.output
    else:
        assert_one_line_error(info, named)
    verify = run_cli("verify", out, expect_ok=False)
    assert verify.exit_code == DAMAGED and named in verify.output and "Traceback" not in verify.output
    args = _extract_test_split(digits_teacher["checkpoint"], out)
    if not rerun_recovers:
        assert_one_line_error(run_cli(*args, expect_ok=False), named, "kdpipe extract --overwrite rebuilds the store")
        args.append("--overwrite")
    run_cli(*args)
    assert run_cli("verify", out).exit_code == SOUND
    assert load_script("soak").zarr_bytes_equal(extracted / STORE_NAME, out / STORE_NAME) > 0


def test_verify_exit_status(tmp_path):
    """0 sound, 1 damaged (here a NaN written through zarr, so its checksum is good), 2 incomplete; --repair turns
    the damaged block into an unwritten one."""
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 4)).astype(np.float16), np.arange(8) % 2
    make_store(tmp_path / "sound" / STORE_NAME, {"x": x}, labels)
    assert run_cli("verify", tmp_path / "sound").exit_code == SOUND
    make_store(tmp_path / "partial" / STORE_NAME, {"x": x}, labels, complete=False)
    result = run_cli("verify", tmp_path / "partial", expect_ok=False)
    assert result.exit_code == INCOMPLETE and "store incomplete" in result.output
    make_store(tmp_path / "nan" / STORE_NAME, {"x": x}, labels)
    zarr.open_group(str(tmp_path / "nan" / STORE_NAME), mode="r+")["train/features/x"][5, 2] = np.nan
    result = run_cli("verify", tmp_path / "nan", expect_ok=False)
    assert result.exit_code == DAMAGED
    assert "train/features/x chunk 0 (rows 0-7): a value NaN or Inf at row 5" in result.output
    assert run_cli("verify", tmp_path / "nan", "--repair", expect_ok=False).exit_code == DAMAGED
    assert run_cli("verify", tmp_path / "nan", expect_ok=False).exit_code == INCOMPLETE


def test_a_repair_killed_before_it_flags_a_block_leaves_the_store_incomplete(tmp_path, monkeypatch):
    """--repair clears `complete` (the store's and the split's) before it flags any block unwritten, so a kill in
    between leaves a store that says it is incomplete."""
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float16)
    make_store(tmp_path / "nan" / STORE_NAME, {"x": x}, np.arange(8) % 2)
    zarr.open_group(str(tmp_path / "nan" / STORE_NAME), mode="r+")["train/features/x"][5, 2] = np.nan

    def killed(self, key, value):
        raise KeyboardInterrupt  # the kill, as the first block flag is written

    monkeypatch.setattr(zarr.Array, "__setitem__", killed)
    with pytest.raises(KeyboardInterrupt):
        verify_store(tmp_path / "nan", repair=True)
    monkeypatch.undo()
    store = FeatureStore.open(tmp_path / "nan")
    assert not store.complete and not store.split("train").complete
    assert store.split("train").missing_blocks() == []  # the flag was never written: the kill came first


# ---------------------------------------------------------------------------------------------------------------
# Size and derived files


def test_extract_refuses_a_store_too_large_before_writing(digits_teacher, store, tmp_path, monkeypatch):
    """The raw-size estimate is exact (the arrays' bytes of the same store), and each bound refuses in one line
    without writing anything of the store; at the bound, extraction runs."""
    raw = sum(split["raw_bytes"] for split in json.loads((store / EXTRACT_SUMMARY).read_text())["splits"].values())
    out = tmp_path / "new"
    args = _extract_test_split(digits_teacher["checkpoint"], out)
    capped = run_cli(*args, "--max-store-gb", raw * 0.999 / 2**30, expect_ok=False)
    assert_one_line_error(capped, f"{out / STORE_NAME} would hold 2.8 MiB raw, above --max-store-gb")
    disk = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk._replace(free=raw - 1))
    full = run_cli(*args, expect_ok=False)
    assert_one_line_error(full, f"{out / STORE_NAME} needs 2.8 MiB raw but {out} has 2.8 MiB free")
    assert not (out / STORE_NAME).exists() and not (out / "extract_args.yaml").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk._replace(free=raw))
    ran = run_cli(*args, "--max-store-gb", raw * 1.001 / 2**30)
    assert f"{out / STORE_NAME}: 2.8 MiB raw (360 rows of 8.1 KiB), 2.8 MiB of it to write" in ran.output
    assert FeatureStore.open(out).complete


def test_overwrite_removes_what_described_the_old_store(digits_teacher, store):
    run_cli("score", store, "--split", "test")
    derived = score_files(store / STORE_NAME)
    assert all(path.is_file() for path in derived)
    args = _extract_test_split(digits_teacher["checkpoint"], store)
    args[args.index("layer3.2")] = "layer2.2"
    run_cli(*args, "--overwrite")
    assert not any(path.exists() for path in derived)
    hash_now = FeatureStore.open(store).meta["config_hash"]
    assert json.loads((store / EXTRACT_SUMMARY).read_text())["config_hash"] == hash_now


def _rewrite_metadata(array_dir: Path, edit) -> None:
    """Another tool's (or a hand's) edit of one array's zarr.json."""
    path = array_dir / "zarr.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


ALTERED_METADATA = {
    "rows": ("features/layer3.2", lambda m: m.update(shape=[m["shape"][0] - 1, *m["shape"][1:]]), "rows 399"),
    "fill value": ("features/layer2.2", lambda m: m.update(fill_value=0.0), "fill value 0.0"),
    "no checksum": ("labels", lambda m: m.update(codecs=m["codecs"][:-1]), "checksum False"),
    "logits width": (
        "logits",
        lambda m: (
            m.update(shape=[m["shape"][0], 7]),
            m["chunk_grid"]["configuration"].update(
                chunk_shape=[m["chunk_grid"]["configuration"]["chunk_shape"][0], 7]
            ),
        ),
        "width (7,)",
    ),
    "feature shape": (
        "features/layer3.2",
        lambda m: (
            m.update(shape=[m["shape"][0], 1, *m["shape"][2:]]),
            m["chunk_grid"]["configuration"].update(
                chunk_shape=[m["chunk_grid"]["configuration"]["chunk_shape"][0], 1, *m["shape"][2:]]
            ),
        ),
        "sample shape (1,",
    ),
}


@pytest.mark.parametrize("case", ALTERED_METADATA)
def test_array_metadata_kdpipe_did_not_write_is_one_line_in_every_reader(case, scored_store, tmp_path):
    """An array whose metadata disagrees with what kdpipe created (its rows, fill value, checksum, a feature's
    shape, the logits' width) is named, with the field, by verify, score and distill, before any number is read."""
    array, edit, field = ALTERED_METADATA[case]
    store = tmp_path / "store"
    shutil.copytree(scored_store, store)
    _rewrite_metadata(store / STORE_NAME / "train" / array, edit)
    where = f"train/{array}: {field}"
    result = run_cli("verify", store, expect_ok=False)
    assert (
        result.exit_code == DAMAGED
        and where in result.output
        and "kdpipe extract --overwrite rebuilds" in result.output
    )
    assert_one_line_error(run_cli("score", store, "--no-plot", expect_ok=False), where)
    distill = ["distill", store, "--method", "kd", "--student", "resnet8", "--out", tmp_path / "run", "--device", "cpu"]
    assert_one_line_error(run_cli(*distill, "--steps", 1, expect_ok=False), where)
