"""A read-only or full disk in every command: one `Error:` line naming the path, a non-zero exit, nothing written
in part; teach and distill lose at most the epoch in progress and resume to the uninterrupted run's bytes."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache.schema import STORE_NAME
from cache.store import FeatureStore
from helpers import STUDENT, Disk, assert_one_line_error, run_cli, weights
from pipeline import DistillConfig, distill
from pipeline.distillation.methods import Distiller
from pipeline.engine.runtime import write_json
from pipeline.engine.training import Trainer
from pipeline.errors import UserError
from pipeline.layout import (
    DISTILL_LOG,
    EXTRACT_SUMMARY,
    TEACH_LOG,
    TEACH_SUMMARY,
    TEACHER_WEIGHTS,
    checkpoint_epochs,
    epoch_weights,
)

SMALL = ["--student", "resnet8", "--model-kwargs", "{base_width: 8}", "--epochs", 1, "--batch-size", 64]
# Each command with its outputs on the disk, and the folder its error must name.
COMMANDS = {
    "teach": (["teach", "--epochs", 1, "--device", "cpu", "--out", "{disk}/teacher"], "teacher"),
    "extract": (
        ["extract", "--checkpoint", "{ckpt}", "--layers", "layer3.2", "--max-samples", 100, "--device", "cpu"]
        + ["--out", "{disk}/extract-2"],
        "extract-2",
    ),
    "score": (["score", "{disk}/extract", "--top-k", 2], "extract"),
    "distill": (["distill", "{disk}/extract", *SMALL, "--device", "cpu", "--out", "{disk}/run-2"], "run-2"),
    "probe": (["probe", "{disk}/run", "--device", "cpu"], "run"),
    "report": (
        ["report", "--store", "{disk}/extract", "--methods", "feature", "--seeds", 0, "--device", "cpu"]
        + ["--out", "{disk}/report"],
        "report",
    ),
}
REASONS = {"read-only": "Read-only file system", "full": "No space left on device"}


@pytest.fixture(scope="module")
def outputs(digits_teacher, scored_store, tmp_path_factory):
    """A disk holding a scored store and a distilled run, for every command to be refused on."""
    with pytest.MonkeyPatch.context() as patch:
        disk = Disk(tmp_path_factory.mktemp("faults") / "disk", patch)
        shutil.copytree(scored_store, disk.path / "extract")
        run = run_cli("distill", disk.path / "extract", *SMALL, "--device", "cpu", "--out", disk.path / "run")
        assert "epoch 1" in run.output  # what a refused run must not show
        yield disk, digits_teacher["checkpoint"]
        disk.close()


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the disk's ballast and the writers' lock files (cache.lock), with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "ballast" and not p.name.endswith(".lock")
    }


@pytest.mark.parametrize("fault", list(REASONS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_disk_refusing_writes_fails_every_command_in_one_line(outputs, command, fault):
    disk, checkpoint = outputs
    args, folder = COMMANDS[command]
    before = files(disk.path)
    disk.read_only() if fault == "read-only" else disk.fill()
    try:
        command_line = [str(a).replace("{disk}", str(disk.path)).replace("{ckpt}", checkpoint) for a in args]
        result = run_cli(*command_line, expect_ok=False)
    finally:
        disk.restore()
    assert_one_line_error(result, "cannot write", str(disk.path / folder), REASONS[fault])
    assert "epoch 1" not in result.output  # teach and distill fail before their first epoch
    after = files(disk.path)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    # Nothing written, nothing lost. Injected faults (no mount) leave zarr's own writes alone: an incomplete store.
    assert not changed or (not disk.real and all(f"extract-2/{STORE_NAME}/" in name for name in changed)), changed


def test_summary_reads_a_read_only_folder(outputs):
    disk, _ = outputs
    disk.read_only()
    try:
        assert "top-2 by Q" in run_cli("summary", disk.path).output
    finally:
        disk.restore()


def test_a_file_rewritten_on_a_full_disk_keeps_its_old_contents(disk):
    path = disk.path / "distill.json"
    write_json(path, {"epoch": 1})
    disk.fill()
    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device"):
        write_json(path, {"epoch": 2, "log": ["x" * 100_000]})
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert sorted(p.name for p in disk.path.iterdir()) == sorted(["distill.json", *["ballast"] * disk.real])


TEACH = ["teach", "--teacher", "resnet8", "--model-kwargs", "{base_width: 4}", "--batch-size", 256]
TEACH += ["--epochs", 2, "--checkpoint-seconds", 0, "--device", "cpu"]


@pytest.mark.slow
def test_teach_on_a_disk_that_fills_keeps_the_last_epoch_and_resumes_exactly(tmp_path, disk, monkeypatch):
    run_cli(*TEACH, "--out", tmp_path / "whole")
    teach_module = importlib.import_module("pipeline.stages.teach")
    real_epoch = teach_module._train_epoch

    def fills_the_disk_in_epoch_2(run, train_loader, test_loader, epoch, *rest):
        if epoch == 2:
            disk.fill()
        return real_epoch(run, train_loader, test_loader, epoch, *rest)

    monkeypatch.setattr(teach_module, "_train_epoch", fills_the_disk_in_epoch_2)
    out = disk.path / "cut"
    result = run_cli(*TEACH, "--out", out, expect_ok=False)
    assert_one_line_error(
        result,
        f"cannot write {epoch_weights(out, 2)}: No space left on device",
        f"the checkpoint of epoch 1 in {out} is kept (--resume continues from it)",
    )
    assert checkpoint_epochs(out) == [1] and not epoch_weights(out, 2).exists() and not list(out.glob("*.tmp"))
    assert not (out / TEACHER_WEIGHTS).exists() and not (out / TEACH_SUMMARY).exists()
    disk.restore()
    monkeypatch.setattr(teach_module, "_train_epoch", real_epoch)
    assert_one_line_error(run_cli(*TEACH, "--out", out, expect_ok=False), "already holds a teach run (epoch 1)")
    run_cli(*TEACH, "--out", out, "--resume")
    assert (out / TEACHER_WEIGHTS).read_bytes() == (tmp_path / "whole" / TEACHER_WEIGHTS).read_bytes()
    assert (out / TEACH_LOG).read_text() == (tmp_path / "whole" / TEACH_LOG).read_text()
    assert checkpoint_epochs(out) == [1, 2]
    # A finished run is reused as it is; --overwrite starts another, the old checkpoints discarded.
    summary = (out / TEACH_SUMMARY).read_text()
    run_cli(*TEACH, "--out", out, "--resume")
    assert (out / TEACH_SUMMARY).read_text() == summary
    run_cli(*TEACH, "--epochs", 1, "--out", out, "--overwrite")
    assert checkpoint_epochs(out) == [1] and json.loads((out / TEACH_SUMMARY).read_text())["epochs"] == 1


@pytest.mark.slow
def test_distill_on_a_disk_that_fills_loses_at_most_the_epoch_in_progress(scored_store, tmp_path, disk, monkeypatch):
    args = {**STUDENT, "checkpoint_seconds": 0.0}  # two epochs, a checkpoint after each
    distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "whole"), **args))
    real_epoch = Trainer.run_epoch

    def fills_the_disk_in_epoch_2(self, epoch, *rest):
        if epoch == 2:
            disk.fill()
        return real_epoch(self, epoch, *rest)

    monkeypatch.setattr(Trainer, "run_epoch", fills_the_disk_in_epoch_2)
    out = disk.path / "cut"
    with pytest.raises(UserError, match=rf"epoch-002\.safetensors: No space .*; the checkpoint of epoch 1 in {out}"):
        distill(DistillConfig(store=str(scored_store), out=str(out), **args))
    assert checkpoint_epochs(out) == [1] and not list(out.glob("*.tmp"))
    disk.restore()
    monkeypatch.setattr(Trainer, "run_epoch", real_epoch)
    distill(DistillConfig(store=str(scored_store), out=str(out), resume=True, **args))
    whole, cut = weights(tmp_path / "whole"), weights(out)
    assert whole.keys() == cut.keys() and all(np.array_equal(whole[k].numpy(), cut[k].numpy()) for k in whole)
    assert (out / DISTILL_LOG).read_text().count("\n") == (tmp_path / "whole" / DISTILL_LOG).read_text().count("\n")


def test_a_non_finite_loss_names_the_epoch_and_that_no_checkpoint_exists_yet(scored_store, tmp_path, monkeypatch):
    real_forward = Distiller.forward

    def diverges(self, images, batch):
        output, losses = real_forward(self, images, batch)
        return output, {k: v * float("nan") for k, v in losses.items()}

    monkeypatch.setattr(Distiller, "forward", diverges)
    with pytest.raises(
        UserError, match=r"not finite at epoch 1; no checkpoint exists yet \(a rerun starts from epoch 1"
    ):
        distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "run"), **STUDENT))


@pytest.mark.slow
def test_extract_on_a_disk_that_fills_resumes_when_space_is_freed(digits_teacher, tmp_path, disk, monkeypatch):
    """A disk another writer fills during the extraction (the size check before it saw enough room)."""
    if not disk.real:
        pytest.skip("needs a real small disk (mount); test_reliability injects the same fault into zarr's writes")
    roomy = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(importlib.import_module("pipeline.stages.extract").shutil, "disk_usage", lambda path: roomy)
    args = ["extract", "--checkpoint", digits_teacher["checkpoint"], "--layers", "layer3.2", "--splits", "test"]
    args += ["--device", "cpu"]
    run_cli(*args, "--out", tmp_path / "whole")
    disk.fill(leave_bytes=512 << 10)
    result = run_cli(*args, "--out", disk.path / "cut", expect_ok=False)
    assert_one_line_error(result, "No space left on device", str(disk.path / "cut"), "resumes with the same command")
    assert not FeatureStore.open(disk.path / "cut").complete and not (disk.path / "cut" / EXTRACT_SUMMARY).exists()
    disk.restore()
    run_cli(*args, "--out", disk.path / "cut")
    cut, whole = (
        zarr.open_group(str(p / STORE_NAME))["test/features/layer3.2"][:]
        for p in (disk.path / "cut", tmp_path / "whole")
    )
    assert np.array_equal(cut, whole)
