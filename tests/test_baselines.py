"""Baselines under the feature method's recipe: label budget, step budget, ce/kd runs, and `kdpipe report`."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from cache.reader import CachedTargets
from cache.schema import ATTR_KEY, STORE_NAME
from cache.store import FeatureStore
from helpers import STUDENT, assert_one_line_error, own_classifier_top1, run_cli, weights
from pipeline import DistillConfig, ExtractConfig, ProbeConfig, distill, extract, probe
from pipeline.data.datasets import load_split, stratified_subset
from pipeline.engine.training import Trainer
from pipeline.layout import DISTILL_LOG, LABELLED_INDICES, PROBE_SUMMARY, REPORT_SUMMARY, REPORT_TEXT, STUDENT_WEIGHTS
from pipeline.stages.report import recipe_differences

BUDGET = {**STUDENT, "label_fraction": 0.25, "steps": 10, "batch_size": 20}


def test_stratified_subset_is_seeded_and_keeps_class_shares():
    labels = np.repeat(np.arange(4), [40, 20, 20, 20])
    picked = stratified_subset(labels, 0.25, seed=0)
    assert np.array_equal(picked, stratified_subset(labels, 0.25, seed=0))
    assert not np.array_equal(picked, stratified_subset(labels, 0.25, seed=1))
    assert np.bincount(labels[picked]).tolist() == [10, 5, 5, 5]


def test_cached_targets_serve_only_the_given_rows(scored_store):
    part = FeatureStore.open(scored_store).split("train")
    rows = stratified_subset(part.array("labels")[:], 0.25, seed=0)
    labels = part.array("labels")[:]
    for memory in (1 << 40, 0):
        targets = CachedTargets(part, ["labels", "logits"], memory, window=2, rows=rows)
        windows = targets.epoch_order(np.random.default_rng(0))
        served = []
        for batch_rows, _, (batch_labels, _) in targets.batches(windows, 10):
            np.testing.assert_array_equal(batch_labels, labels[batch_rows])
            served.append(batch_rows)
        assert sorted(np.concatenate(served).tolist()) == rows.tolist()


def test_a_labelled_subset_smaller_than_a_batch_is_cycled_to_fill_it(scored_store, tmp_path):
    part = FeatureStore.open(scored_store).split("train")
    labels = part.array("labels")[:]
    rows = stratified_subset(labels, 0.03, seed=0)  # 12 labelled rows
    for memory in (1 << 40, 0):
        targets = CachedTargets(part, ["labels"], memory, window=2, rows=rows)
        windows = targets.epoch_order(np.random.default_rng(0), at_least=20)
        order = np.concatenate(windows)
        assert len(order) == 24 and sorted(order[:12]) == sorted(order[12:]) == rows.tolist()  # two shuffled passes
        ((batch_rows, _, (batch_labels,)),) = list(targets.batches(windows, 20))
        np.testing.assert_array_equal(batch_labels, labels[batch_rows])
        assert set(batch_rows.tolist()) == set(rows.tolist())
    summary = distill(
        DistillConfig(
            store=str(scored_store),
            out=str(tmp_path / "kd"),
            method="kd",
            **{**BUDGET, "label_fraction": 0.03, "steps": 3},
        )
    )
    assert summary["num_training_rows"] == 12 and summary["steps"] == 3 and summary["epochs"] == 3


@pytest.mark.slow
def test_label_and_step_budget(scored_store, tmp_path):
    """ce trains on the labelled quarter for exactly 10 steps; feature distills on every row, and its probe is
    fitted on the same labelled quarter; --no-unlabelled-distill restricts the feature method to it."""
    ce = distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "ce"), method="ce", **BUDGET))
    assert ce["num_training_rows"] == ce["num_labelled"] == 100 and ce["teacher_taps"] == []
    assert ce["epochs"] == 2 and ce["steps"] == 10  # 5 steps per epoch
    assert ce["test_split"] == "test" and ce["test_top1"] == pytest.approx(
        own_classifier_top1(tmp_path / "ce"), abs=100 / ce["num_test"]
    )
    log = (tmp_path / "ce" / DISTILL_LOG).read_text().splitlines()
    assert len(log) == 1 + 2
    feature = distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "feature"), **BUDGET))
    assert feature["num_training_rows"] == 400 and feature["num_labelled"] == 100
    assert feature["epochs"] == 1  # 20 steps per epoch: the one epoch is cut at 10
    labelled = np.load(tmp_path / "feature" / LABELLED_INDICES)
    assert np.array_equal(labelled, np.load(tmp_path / "ce" / LABELLED_INDICES))  # the same subset for one seed
    assert probe(ProbeConfig(run=str(tmp_path / "feature"), device="cpu"))["num_train"] == 100
    strict = distill(
        DistillConfig(store=str(scored_store), out=str(tmp_path / "strict"), unlabelled_distill=False, **BUDGET)
    )
    assert strict["num_training_rows"] == 100


@pytest.mark.slow
def test_ce_never_touches_the_teacher(scored_store, tmp_path):
    """Permuting every cached feature and logit changes no weight of the ce student; kd does read the logits."""
    permuted = tmp_path / "permuted"
    shutil.copytree(scored_store, permuted)
    group = zarr.open_group(str(permuted / STORE_NAME), mode="r+")
    rng = np.random.default_rng(0)
    for path in ("train/logits", "train/features/layer2.2", "train/features/layer3.2"):
        group[path][:] = rng.permutation(group[path][:])
    for store, out in ((scored_store, "a"), (permuted, "b")):
        distill(DistillConfig(store=str(store), out=str(tmp_path / out), method="ce", **BUDGET))
        distill(DistillConfig(store=str(store), out=str(tmp_path / f"kd-{out}"), method="kd", **BUDGET))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    kd_a, kd_b = weights(tmp_path / "kd-a"), weights(tmp_path / "kd-b")
    assert not all(torch.equal(kd_a[k], kd_b[k]) for k in kd_a)


def _report_config(tmp_path, scored_store, steps: int = 6) -> str:
    config = {
        "report": {
            "store": str(scored_store),
            "out": str(tmp_path / "report"),
            "methods": ["ce", "kd", "feature", "feature+no-unlabelled-distill"],
        },
        "distill": {
            "student": "resnet8",
            "model_kwargs": {"base_width": 8},
            "student_layers": ["layer2.0", "layer3.0"],
            "steps": steps,
            "batch_size": 25,
            "label_fraction": 0.25,
        },
        "probe": {"max_iter": 50},
        "device": "cpu",
    }
    path = tmp_path / "report.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow  # a report of several runs, reused and refused: CI only, to keep `make test-fast` under a minute
def test_report_runs_then_reuses_and_refuses_changed_settings(scored_store, tmp_path, monkeypatch):
    config = _report_config(tmp_path, scored_store)
    result = run_cli("report", "--config", config, "--seeds", "0,1")
    out = tmp_path / "report"
    summary = json.loads((out / REPORT_SUMMARY).read_text())
    assert [m["method"] for m in summary["methods"]] == ["ce", "kd", "feature", "feature+no-unlabelled-distill"]
    for row in summary["methods"]:
        runs = [r for r in summary["runs"] if r["method"] == row["method"]]
        assert row["runs"] == 2 and row["mean"] == pytest.approx(np.mean([r["top1"] for r in runs]))
        assert row["std"] == pytest.approx(np.std([r["top1"] for r in runs], ddof=1))
    ce, kd, feature, strict = summary["methods"]
    assert ce["gain"] == 0.0 and kd["gain"] == pytest.approx(kd["mean"] - ce["mean"])
    assert feature["evaluated_with"] == "linear probe" and feature["num_training_rows"] == 400
    assert strict["num_training_rows"] == 100 and (out / "feature+no-unlabelled-distill" / "seed-1").is_dir()
    seed1 = json.loads((out / "feature" / "seed-1" / PROBE_SUMMARY).read_text())
    assert seed1["test_top1"] == feature["top1"][1]
    assert "| feature | feature_mse | layer2.2, layer3.2 |" in (out / REPORT_TEXT).read_text()
    assert "| kd | ce + kd |" in result.output and (out / "report.png").stat().st_size > 0

    # A second report reuses every run: nothing trains, no probe is refitted.
    probe_module = importlib.import_module("pipeline.stages.probe")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(Trainer, "run_epoch", must_not_run)
    monkeypatch.setattr(probe_module, "fit_linear", must_not_run)
    run_cli("report", "--config", config, "--seeds", "0,1")
    assert json.loads((out / REPORT_SUMMARY).read_text())["methods"] == summary["methods"]

    # Other probe settings refit the probes only.
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "run_epoch", must_not_run)
    config_path = Path(config)
    config_path.write_text(config_path.read_text().replace("max_iter: 50", "max_iter: 40"))
    run_cli("report", "--config", config, "--seeds", "0,1")
    assert json.loads((out / "feature" / "seed-0" / PROBE_SUMMARY).read_text())["max_iter"] == 40

    # Other settings for the same folder are refused with the setting named, before anything is overwritten.
    before = (out / "ce" / "seed-0" / STUDENT_WEIGHTS).read_bytes()
    changed = run_cli("report", "--config", _report_config(tmp_path, scored_store, steps=8), expect_ok=False)
    assert_one_line_error(changed, "made with steps = 6, not 8")
    assert (out / "ce" / "seed-0" / STUDENT_WEIGHTS).read_bytes() == before


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--seeds", "0,x"], "not a comma-separated list of seeds >= 0"),
        (["--seeds", "-1"], "not a comma-separated list of seeds >= 0"),
        (["--methods", "ce,dkd"], "unknown method 'dkd'"),
        (["--methods", "ce,feature+lr"], "`kdpipe distill --lr` is not a flag"),
    ],
)
def test_report_bad_input(scored_store, tmp_path, args, fragment):
    result = run_cli("report", "--config", _report_config(tmp_path, scored_store), *args, expect_ok=False)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "report" / "ce").exists()


def test_kd_on_a_store_without_logits(digits_teacher, tmp_path):
    """Refused in one line; in a report, before any run starts."""
    args = dict(checkpoint=digits_teacher["checkpoint"], layers=("layer3.2",), max_samples=100, device="cpu")
    extract(ExtractConfig(out=str(tmp_path / "s"), logits=False, **args))
    result = run_cli("distill", tmp_path / "s", "--method", "kd", "--out", tmp_path / "r", expect_ok=False)
    assert_one_line_error(result, "--method kd reads logits", "does not hold")
    assert not (tmp_path / "r").exists()
    config = tmp_path / "c.yaml"
    config.write_text("distill: {batch_size: 20, steps: 2}\n")
    report = ["report", "--config", config, "--store", tmp_path / "s", "--methods", "ce,kd", "--out", tmp_path / "rep"]
    assert_one_line_error(run_cli(*report, "--device", "cpu", expect_ok=False), "--method kd reads logits")
    assert not (tmp_path / "rep" / "ce").exists()


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (
            ["--method", "feature-standard", "--student-layers", "layer1.0,layer2.0,layer3.0,layer3.1"],
            "has 3 stage ends for 4",
        ),
        (["--method", "feature-standard"], "teacher tap 'layer1.2' (a stage end of the teacher) is not in"),
        (["--method", "ce", "--label-fraction", "0.999"], "--label-fraction 0.999: cannot draw a class-stratified"),
        (["--method", "ce", "--label-fraction", "0.01"], "--label-fraction 0.01: cannot draw a class-stratified"),
    ],
)
def test_baseline_bad_input(scored_store, tmp_path, extra, fragment):
    args = ["distill", scored_store, "--student", "resnet20", "--steps", 1, "--out", tmp_path / "r", *extra]
    assert_one_line_error(run_cli(*args, "--device", "cpu", expect_ok=False), fragment)
    assert not (tmp_path / "r").exists()


def test_tiny_label_budget_probe_falls_back_to_a_fixed_weight_decay(scored_store, tmp_path, caplog):
    """12 labelled images of 10 classes cannot spare a stratified validation part: the probe still fits, warning
    with the smallest class named."""
    run = tmp_path / "feature"
    distill(DistillConfig(store=str(scored_store), out=str(run), **{**BUDGET, "label_fraction": 0.03, "steps": 2}))
    summary = probe(ProbeConfig(run=str(run), device="cpu"))
    assert summary["num_train"] == 12 and summary["validation_top1_by_weight_decay"] == {}
    assert summary["weight_decay"] == 1e-3
    labels = np.load(run / LABELLED_INDICES)
    counts = np.bincount(load_split("digits", "train").labels[labels], minlength=10)
    smallest = min(np.flatnonzero(counts), key=lambda c: counts[c])
    assert (
        f"to hold out every class for choosing the weight decay (class '{smallest}' has {counts[smallest]})"
        in caplog.text
    )
    (run / LABELLED_INDICES).unlink()
    assert_one_line_error(run_cli("probe", run, "--device", "cpu", expect_ok=False), "labelled subset", "unknown")


def test_report_flags_runs_that_do_not_share_one_recipe():
    base = {
        "student": "resnet8",
        "steps": 360,
        "batch_size": 32,
        "lr": 0.05,
        "label_fraction": 0.1,
        "num_labelled": 143,
    }
    results = [{**base, "method": "ce"}, {**base, "method": "feature", "steps": 3600}]
    assert recipe_differences(results) == "steps differs (ce 360, feature 3600)"
    assert recipe_differences(results[:1]) == ""


@pytest.mark.slow
def test_evaluation_follows_the_configured_losses(scored_store, tmp_path):
    """kd with its ce term dropped (the paper's KD without CE) still trains, and is evaluated with, the student's own
    head, on every row since no label is read; ce added to the feature method trains its head too. The report
    evaluates each run as the run records it."""
    kd_only = distill(
        DistillConfig(store=str(scored_store), out=str(tmp_path / "kd"), method="kd", losses={"ce": 0}, **BUDGET)
    )
    assert kd_only["losses"] == {"kd": {"weight": 1.0, "temperature": 4.0}}
    assert kd_only["evaluated_with"] == "own classifier" and "test_top1" in kd_only
    assert kd_only["num_training_rows"] == 400
    with_ce = distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "f"), losses={"ce": 1.0}, **BUDGET))
    assert with_ce["evaluated_with"] == "own classifier" and with_ce["num_training_rows"] == 100
    config = tmp_path / "report.yaml"
    settings = {k: v for k, v in BUDGET.items() if k != "device"}
    config.write_text(
        yaml.safe_dump(
            {
                "report": {"store": str(scored_store), "out": str(tmp_path / "rep"), "methods": ["kd"], "seeds": 0},
                "distill": {**settings, "losses": {"ce": 0}},
                "device": "cpu",
            }
        )
    )
    run_cli("report", "--config", config, "--no-plot")
    (run,) = json.loads((tmp_path / "rep" / REPORT_SUMMARY).read_text())["runs"]
    assert (
        run["evaluated_with"] == "own classifier"
        and run["top1"] == json.loads((tmp_path / "rep" / "kd" / "seed-0" / "distill.json").read_text())["test_top1"]
    )


def test_stores_from_before_stage_ends_were_recorded_still_serve_standard_methods(scored_store, tmp_path):
    """An older store has no `stage_ends` in its identity: they are read off the rebuilt teacher architecture."""
    old = tmp_path / "old"
    shutil.copytree(scored_store, old)
    store = FeatureStore.open(old, mode="r+")
    meta = store.meta
    del meta["identity"]["teacher"]["stage_ends"]
    store.group.attrs[ATTR_KEY] = meta
    pairs = {}
    for name, path in (("new", scored_store), ("old", old)):
        args = ["distill", path, "--student", "resnet20", "--method", "feature-standard", "--steps", 1]
        run_cli(*args, "--student-layers", "layer2.2,layer3.2", "--out", tmp_path / name, "--device", "cpu")
        summary = json.loads((tmp_path / name / "distill.json").read_text())
        pairs[name] = [p["teacher"] for p in summary["pairs"]]
    assert pairs["old"] == pairs["new"] == ["layer2.2", "layer3.2"]
