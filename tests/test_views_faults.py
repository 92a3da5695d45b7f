"""Augmented views under faults: an extract interrupted inside an augmented view resumes byte-identically, writing only
the (view, block)s it lacks; a damaged chunk of a view is named by verify, flagged alone by --repair and recomputed
alone; distill on cached views, interrupted, resumes exactly; a view's missing or unreadable parameters are one line;
every misuse of --views and --augment is one `Error:` line that leaves nothing behind.

The store is tiny (24 training images, 64 KiB chunks: three 8-row blocks in each of three views), so these stay fast.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import zarr

from cache.schema import STORE_NAME
from cache.store import FeatureStore
from cache.verify import DAMAGED
from helpers import STUDENT as STUDENT_SETTINGS
from helpers import assert_one_line_error, interrupted_in_epoch, load_script, run_cli, small_chunks, weights
from pipeline import DistillConfig, distill
from pipeline.layout import DISTILL_SUMMARY, EXTRACT_SUMMARY, STUDENT_WEIGHTS

ROWS, BLOCK, BLOCKS = 24, 8, 3  # layer3.2's rows are 8 KiB: 64 KiB chunks of 8 rows make the block
CHUNK_BYTES = 64 << 10
VIEW_ARRAYS = ("features/layer2.2", "features/layer3.2", "params", "logits", "progress")  # an augmented view's
STUDENT = ["--student", "resnet8", "--model-kwargs", "{base_width: 8}", "--device", "cpu"]
DISTILL = [*STUDENT, "--teacher-layers", "layer3.2", "--student-layers", "layer3.0", "--epochs", 1, "--batch-size", 8]


def _extract_args(checkpoint: str, out: Path, *extra) -> list:
    return [
        "extract",
        "--checkpoint",
        checkpoint,
        "--layers",
        "layer2.2,layer3.2",
        "--max-samples",
        ROWS,
        "--views",
        3,
        "--augment",
        "crop",
        "--batch-size",
        BLOCK,
        "--device",
        "cpu",
        "--out",
        out,
        *extra,
    ]


def _extract(checkpoint: str, out: Path, expect_ok: bool = True):
    with small_chunks(CHUNK_BYTES):
        return run_cli(*_extract_args(checkpoint, out), expect_ok=expect_ok)


@pytest.fixture(scope="module")
def views_store(digits_teacher, tmp_path_factory):
    """A complete store of 24 training images in three views (1 and 2 cropped), three 8-row blocks each."""
    out = tmp_path_factory.mktemp("views")
    _extract(digits_teacher["checkpoint"], out)
    part = FeatureStore.open(out).split("train")
    assert (part.num_views, part.block_rows, part.num_blocks) == (3, BLOCK, BLOCKS)
    return out


def _bytes_equal(first: Path, second: Path) -> int:
    """The soak's oracle: every array of every view (block flags too) byte-identical, every group's attributes equal."""
    return load_script("soak").zarr_bytes_equal(first / STORE_NAME, second / STORE_NAME)


def _place(path: str) -> tuple[str, str]:
    """(group, array) of an array's store path: ('train/views/2', 'features/layer3.2')."""
    parts = path.split("/")
    cut = 3 if parts[1:2] == ["views"] else 1
    return "/".join(parts[:cut]), "/".join(parts[cut:])


@contextlib.contextmanager
def recorded_writes(monkeypatch, interrupt_after: tuple[str, int] | None = None):
    """Yields the set of (group, array, block) every array write inside the block touched. With `interrupt_after`
    (an array's store path, a block), the run is interrupted (KeyboardInterrupt, as Ctrl-C) just after that array's
    rows of that block are on disk: whatever else the block holds is not."""
    writes: set[tuple[str, str, int]] = set()
    real = zarr.Array.__setitem__

    def recording(self, key, value):
        real(self, key, value)
        group, array = _place(self.path)
        rows = key[0] if isinstance(key, tuple) else key
        if array == "progress":  # indexed by block
            blocks = [rows]
        else:
            start, stop, _ = rows.indices(self.shape[0])
            blocks = range(start // BLOCK, (stop - 1) // BLOCK + 1)
        writes.update((group, array, int(b)) for b in blocks)
        if interrupt_after and self.path == interrupt_after[0] and interrupt_after[1] in blocks:
            raise KeyboardInterrupt

    monkeypatch.setattr(zarr.Array, "__setitem__", recording)
    try:
        yield writes
    finally:
        monkeypatch.setattr(zarr.Array, "__setitem__", real)


def _flags(out: Path) -> dict[str, list[int]]:
    return {view.name: view.array("progress")[:].tolist() for view in FeatureStore.open(out).split("train").views()}


def _rewritten(group: str, blocks) -> set[tuple[str, str, int]]:
    return {(group, array, b) for array in VIEW_ARRAYS for b in blocks}


def test_interrupted_in_an_augmented_view_resumes_byte_identical(digits_teacher, views_store, tmp_path, monkeypatch):
    """Interrupted in view 2's block 1 between its arrays (layer3.2's chunk written, its parameters and logits not,
    the block unflagged), the same extract writes exactly view 2's blocks 1 and 2, and the store is the uninterrupted
    one byte for byte."""
    out, store = tmp_path / "out", tmp_path / "out" / STORE_NAME
    with recorded_writes(monkeypatch, interrupt_after=("train/views/2/features/layer3.2", 1)):
        assert "Aborted" in _extract(digits_teacher["checkpoint"], out, expect_ok=False).output
    assert _flags(out) == {"train": [1] * 3, "train/views/1": [1] * 3, "train/views/2": [1, 0, 0]}
    torn = store / "train" / "views" / "2"
    assert (torn / "features" / "layer3.2" / "c" / "1" / "0" / "0" / "0").is_file()
    assert not (torn / "params" / "c" / "1" / "0").exists() and not (torn / "logits" / "c" / "1" / "0").exists()
    assert not FeatureStore.open(out).complete and not (out / EXTRACT_SUMMARY).exists()

    with recorded_writes(monkeypatch) as writes:
        _extract(digits_teacher["checkpoint"], out)
    assert writes == _rewritten("train/views/2", range(1, BLOCKS))
    assert json.loads((out / EXTRACT_SUMMARY).read_text())["splits"]["train"]["images"] == 2 * BLOCK
    assert _bytes_equal(views_store, out) > 0


def test_a_damaged_chunk_of_a_view_is_named_repaired_and_recomputed_alone(
    digits_teacher, views_store, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(views_store, out)
    chunk = out / STORE_NAME / "train" / "views" / "2" / "features" / "layer3.2" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    where = "train/views/2/features/layer3.2 chunk 2 (rows 16-23): damaged"
    verify = run_cli("verify", out, expect_ok=False)
    assert verify.exit_code == DAMAGED
    assert_one_line_error(verify, where, "--repair marks them")
    assert_one_line_error(run_cli("verify", out, "--repair", expect_ok=False), where, "rerun the same kdpipe extract")
    assert _flags(out) == {"train": [1] * 3, "train/views/1": [1] * 3, "train/views/2": [1, 1, 0]}
    assert not FeatureStore.open(out).complete
    assert "view 2 (views/2/, with params)" in next(
        line for line in run_cli("info", out).output.splitlines() if "1/3 blocks missing" in line
    )

    with recorded_writes(monkeypatch) as writes:
        _extract(digits_teacher["checkpoint"], out)
    assert writes == _rewritten("train/views/2", [2])
    assert "all values sound; store complete" in run_cli("verify", out).output
    assert _bytes_equal(views_store, out) > 0


@pytest.mark.slow  # six short runs: the fast suite has no second to spare; scripts/soak.py SIGKILLs one too
@pytest.mark.parametrize("memory_gb, order", [(0.0, "a view per block"), (1.0, "a view per row")])
def test_distill_on_cached_views_resumes_exactly(views_store, tmp_path, monkeypatch, memory_gb, order):
    """Interrupted in epoch 3 and resumed, a run drawing each row's view (streamed: each block's) from the store's
    three views ends with the uninterrupted run's weights, bit for bit."""
    settings = dict(STUDENT_SETTINGS, epochs=3, batch_size=8, cache_memory_gb=memory_gb, checkpoint_seconds=0.0)
    config = dict(store=str(views_store), teacher_layers=("layer3.2",), student_layers=("layer3.0",), **settings)
    whole = distill(DistillConfig(out=str(tmp_path / "whole"), **config))
    assert order in whole["target_order"] and whole["augmentation"]["views"] == 3
    with interrupted_in_epoch(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(out=str(tmp_path / "cut"), **config))
    assert not (tmp_path / "cut" / STUDENT_WEIGHTS).exists()
    distill(DistillConfig(out=str(tmp_path / "cut"), resume=True, **config))
    first, second = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _rm(path: Path) -> None:
    shutil.rmtree(path)


def _truncate(path: Path) -> None:
    meta = path / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:25])


def _drop_chunk(path: Path) -> None:
    (path / "c" / "1" / "0").unlink()


# damage to train/views/1/params, and what info (None: it reads no chunk, and shows the store) and distill name
PARAMS_DAMAGE = {
    "deleted": (_rm, "train/views/1/params/zarr.json is missing", None),
    "metadata unreadable": (_truncate, "train/views/1/params/zarr.json is unreadable", None),
    "a chunk deleted": (_drop_chunk, None, "train/views/1/params row 8 holds a value out of range"),
}


@pytest.mark.parametrize("case", list(PARAMS_DAMAGE))
def test_a_view_with_missing_or_unreadable_parameters_is_refused_in_one_line(
    digits_teacher, views_store, tmp_path, case
):
    """info and distill refuse in one line naming the file, or for a missing chunk distill names the array and row
    (the chunk reads as -1, which no view's crop box holds, rather than replaying a box of -1s); nothing of a run is
    left looking complete, and the same extract (after verify --repair, for the chunk) restores the store byte for
    byte."""
    damage, named, chunk_named = PARAMS_DAMAGE[case]
    out, run = tmp_path / "out", tmp_path / "run"
    shutil.copytree(views_store, out)
    damage(out / STORE_NAME / "train" / "views" / "1" / "params")
    rewrites = "the same kdpipe extract writes split 'train' again"
    if named:
        assert_one_line_error(run_cli("info", out, expect_ok=False), str(out / STORE_NAME), named, rewrites)
        assert_one_line_error(run_cli("distill", out, *DISTILL, "--out", run, expect_ok=False), named, rewrites)
    else:
        assert "view 1 (views/1/, with params)" in run_cli("info", out).output
        assert_one_line_error(run_cli("distill", out, *DISTILL, "--out", run, expect_ok=False), chunk_named)
        verify = run_cli("verify", out, expect_ok=False).output
        assert "train/views/1/params chunk 1 (rows 8-15): missing, though its block is marked written" in verify
        run_cli("verify", out, "--repair", expect_ok=False)
        assert _flags(out)["train/views/1"] == [1, 0, 1]
    assert not (run / DISTILL_SUMMARY).exists() and not (run / STUDENT_WEIGHTS).exists()
    _extract(digits_teacher["checkpoint"], out)
    assert _bytes_equal(views_store, out) > 0


EXTRACT_MISUSE = {
    "views without a policy": (["--views", 3], "--views 3: views 1..2 need --augment POLICY (crop, crop-flip"),
    "a policy with one view": (["--augment", "crop"], "--augment crop: --views 1 is the plain image alone"),
    "unknown policy": (["--views", 2, "--augment", "zoom"], "unknown augmentation policy 'zoom'; known: crop, "),
    "unknown setting": (
        ["--views", 2, "--augment", "crop", "--augment-kwargs", "{pad: 2}"],
        "augmentation 'crop' has no setting 'pad'; it takes padding, interpolation, antialias",
    ),
    "negative padding": (
        ["--views", 2, "--augment", "crop", "--augment-kwargs", "{padding: -1}"],
        "--augment crop: augmentation setting padding must be >= 0, not -1",
    ),
    "padding not a number": (
        ["--views", 2, "--augment", "crop", "--augment-kwargs", "{padding: wide}"],
        "padding must be int, not 'wide'",
    ),
    "flip above 1": (
        ["--views", 2, "--augment", "crop-flip", "--augment-kwargs", "{flip: 1.5}"],
        "--augment crop-flip: augmentation setting flip must be in [0, 1], not 1.5",
    ),
    "scale above 1": (
        ["--views", 2, "--augment", "resized-crop-flip", "--augment-kwargs", "{scale: [0.5, 2]}"],
        "setting scale must be two numbers 0 < low <= high <= 1, not [0.5, 2.0]",
    ),
    "unknown interpolation": (
        ["--views", 2, "--augment", "crop", "--augment-kwargs", "{interpolation: cubic}"],
        "interpolation: unknown mode 'cubic'",
    ),
    "settings without a policy": (
        ["--augment-kwargs", "{padding: 2}"],
        "--augment-kwargs: there is no --augment policy to configure",
    ),
}


@pytest.mark.parametrize("case", list(EXTRACT_MISUSE))
def test_extract_refuses_a_misused_augmentation_in_one_line(digits_teacher, tmp_path, case):
    extra, fragment = EXTRACT_MISUSE[case]
    out = tmp_path / "out"
    args = ["extract", "--checkpoint", digits_teacher["checkpoint"], "--layers", "layer3.2", "--device", "cpu"]
    assert_one_line_error(run_cli(*args, *extra, "--out", out, expect_ok=False), fragment)
    assert not out.exists()


DISTILL_MISUSE = {
    "more views than cached": (["--views", 5], "--views 5: {store} holds 3 views per image"),
    "fresh views for feature": (["--augment", "crop"], "--augment crop: no cache holds the teacher's outputs on fresh"),
    "fresh views for kd": (["--method", "kd", "--augment", "crop"], "pass --online-teacher, or cache views"),
    "cached and fresh views": (["--views", 2, "--augment", "crop"], "--views 2 and --augment: fresh views replace"),
    "settings without a policy": (["--augment-kwargs", "{padding: 2}"], "--augment-kwargs: there is no --augment"),
    "online, out of range": (
        ["--online-teacher", "--augment", "crop", "--augment-kwargs", "{padding: -2}"],
        "--augment crop: augmentation setting padding must be >= 0, not -2",
    ),
}


@pytest.mark.parametrize("case", list(DISTILL_MISUSE))
def test_distill_refuses_a_misused_view_in_one_line(views_store, tmp_path, case):
    extra, fragment = DISTILL_MISUSE[case]
    out = tmp_path / "run"
    result = run_cli("distill", views_store, *DISTILL, *extra, "--out", out, expect_ok=False)
    assert_one_line_error(result, fragment.format(store=views_store / STORE_NAME))
    assert not out.exists()


def test_distill_refuses_views_of_a_plain_store(scored_store, tmp_path):
    result = run_cli("distill", scored_store, *STUDENT, "--views", 2, "--out", tmp_path / "run", expect_ok=False)
    assert_one_line_error(result, f"--views 2: {scored_store / STORE_NAME} holds 1 view per image")
