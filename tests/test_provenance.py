"""A store finds its teacher's weights from anywhere: extract records the checkpoint's absolute path, its path from the
store's folder and its sha256, so Block-KD, --online-teacher and verify --recompute run from another working
directory and after the whole project folder moved; a file of another sha256 is refused, naming the places."""

from __future__ import annotations

import shutil

import pytest

from cache.schema import ATTR_KEY
from cache.store import FeatureStore
from helpers import assert_one_line_error, run_cli
from pipeline.engine.provenance import checkpoint_candidates, recorded_checkpoint

CHECKPOINT = "teacher/model.safetensors"
STAGE_ENDS = "layer1.2,layer2.2,layer3.2"  # resnet20's, which fitnet pairs and Block-KD's stones need
STORE = "runs/store"
SMALL = ["--max-samples", 100, "--device", "cpu"]


@pytest.fixture
def project(digits_teacher, tmp_path, monkeypatch):
    """A project folder holding a teacher and a store extracted from inside it with relative paths; the working
    directory is then another folder."""
    project = tmp_path / "project"
    (project / "teacher").mkdir(parents=True)
    shutil.copy(digits_teacher["checkpoint"], project / CHECKPOINT)
    monkeypatch.chdir(project)
    run_cli("extract", "--checkpoint", CHECKPOINT, "--out", STORE, "--layers", STAGE_ENDS, *SMALL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return project


def _teacher_commands(store, out) -> dict[str, list]:
    """Every command that rebuilds the store's teacher (the distill runs checked only: the teacher is built first)."""
    student = [
        "--student",
        "resnet8",
        "--model-kwargs",
        "{base_width: 8}",
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--check",
    ]
    return {
        "block-kd": ["distill", store, "--method", "block-kd", "--out", out / "block-kd", *student],
        "online": ["distill", store, "--method", "fitnet", "--online-teacher", "--out", out / "online", *student],
        "recompute": ["verify", store, "--recompute", 4, "--device", "cpu"],
    }


def test_the_record_is_absolute_and_relative_to_the_store(project):
    meta = FeatureStore.open(project / STORE).meta
    assert meta["checkpoint_path"] == str(project / CHECKPOINT)
    assert meta["checkpoint_relative"] == "../../teacher/model.safetensors"  # from runs/store, beside features.zarr
    assert len(meta["identity"]["teacher"]["checkpoint_sha256"]) == 64


def test_the_teacher_is_found_from_another_folder_and_after_the_project_moved(project, tmp_path):
    _run_every_command(project / STORE, tmp_path / "out")
    shutil.move(project, tmp_path / "moved")  # the absolute path recorded is gone; the one from the store moved too
    _run_every_command(tmp_path / "moved" / STORE, tmp_path / "out")


def _run_every_command(store, out) -> None:
    for name, args in _teacher_commands(store, out).items():
        output = run_cli(*args).output
        assert name != "recompute" or "every cosine >= 0.999" in output, output


def test_a_moved_or_changed_checkpoint_is_refused_naming_the_places(project, tmp_path):
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    (moved / CHECKPOINT).write_bytes((moved / CHECKPOINT).read_bytes() + b" ")  # another file of the same name
    store = moved / STORE
    places = [f"{project / CHECKPOINT} does not exist", f"{moved / CHECKPOINT} holds another file (sha256 "]
    for args in _teacher_commands(store, tmp_path / "out").values():
        result = run_cli(*args, expect_ok=False)
        assert_one_line_error(result, "cannot find the teacher checkpoint", *places, "pass --teacher-checkpoint")
    block_kd = _teacher_commands(store, tmp_path / "out")["block-kd"]
    given = run_cli(*block_kd, "--teacher-checkpoint", moved / CHECKPOINT, expect_ok=False)
    assert_one_line_error(given, f"{moved / CHECKPOINT} (sha256 ", "is not the checkpoint", str(project / CHECKPOINT))


def test_a_relative_only_record_resolves_from_the_working_directory_then_above_the_store(project, monkeypatch):
    store = FeatureStore.open(project / STORE, mode="r+")
    old = {k: v for k, v in store.meta.items() if k != "checkpoint_relative"} | {"checkpoint_path": CHECKPOINT}
    store.group.attrs[ATTR_KEY] = old  # as extract recorded it before: the path given, relative to where it ran
    expected = str(project / CHECKPOINT)
    assert recorded_checkpoint(store, None, "--recompute") == expected  # from above the store: the project
    monkeypatch.chdir(project)
    assert checkpoint_candidates(store)[0] == project / CHECKPOINT  # where extract ran, tried first
    assert recorded_checkpoint(store, None, "--recompute") == expected
