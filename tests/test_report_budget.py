"""The label budget sweep of `kdpipe report` (`label_fractions`): its plan, its tables against the runs' own
summaries, the reuse of the main runs, and the refusal of a fraction that cannot be drawn, before any run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from helpers import assert_one_line_error, run_cli
from pipeline import ReportConfig
from pipeline.layout import (
    DISTILL_SUMMARY,
    PROBE_SUMMARY,
    REPORT_BUDGET_PLOT,
    REPORT_SUMMARY,
    REPORT_TEXT,
    STUDENT_WEIGHTS,
    report_run,
)
from pipeline.stages.report import plan


def test_plan_runs_every_fraction_entry_and_seed_the_main_fraction_in_the_main_folders(tmp_path):
    config = ReportConfig(
        store="s",
        out=str(tmp_path),
        methods="ce,feature",
        seeds="0,1",
        label_fractions="0.5,0.1,0.25,0.1",  # unordered, 0.1 twice, and the main fraction among them
        distill={"label_fraction": 0.25, "steps": 5, "batch_size": 20},
        probe={"max_iter": 7},
    )
    runs = plan(config)
    planned = [(r.label_fraction, r.entry, r.seed, r.folder, r.main) for r in runs]
    expected = [(0.25, e, s, tmp_path / e / f"seed-{s}", True) for e in ("ce", "feature") for s in (0, 1)]
    expected += [
        (f, e, s, tmp_path / e / f"labels-{f}" / f"seed-{s}", False)
        for f in (0.1, 0.5)
        for e in ("ce", "feature")
        for s in (0, 1)
    ]
    assert planned == expected
    main = {(r.entry, r.seed): r for r in runs if r.main}
    for run in runs:
        assert run.distill.label_fraction == run.label_fraction and run.distill.out == str(run.folder)
        assert run.probe.run == str(run.folder)
        # Everything else is the main run's: the sweep changes the label fraction and the folder only.
        same = main[run.entry, run.seed]
        assert replace(run.distill, label_fraction=0.25, out=same.distill.out) == same.distill
        assert replace(run.probe, run=same.probe.run) == same.probe
    assert main["ce", 1].distill.steps == 5 and main["ce", 1].probe.max_iter == 7

    # Without the main fraction among them, the main runs still come first, at the distill section's fraction.
    runs = plan(replace(config, label_fractions=(0.5,), distill={"steps": 5}))
    assert [(r.label_fraction, r.main) for r in runs] == [(1.0, True)] * 4 + [(0.5, False)] * 4
    assert runs[4].folder == report_run(tmp_path, "ce", 0, 0.5) == tmp_path / "ce" / "labels-0.5" / "seed-0"
    # No sweep: today's runs, exactly.
    assert [r.folder for r in plan(replace(config, label_fractions=None))] == [r[3] for r in expected[:4]]


def _config(tmp_path, scored_store, **report) -> str:
    config = {
        "report": {"store": str(scored_store), "out": str(tmp_path / "report"), "methods": ["ce", "feature"], **report},
        "distill": {
            "student": "resnet8",
            "model_kwargs": {"base_width": 8},
            "student_layers": ["layer2.0", "layer3.0"],
            "steps": 4,
            "batch_size": 25,
            "label_fraction": 0.25,
        },
        "probe": {"max_iter": 30},
        "seeds": 0,
        "device": "cpu",
    }
    path = tmp_path / "report.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _own_top1(folder) -> float:
    """A run's held-out top-1 as the run itself recorded it: its own head's (distill.json) or its probe's."""
    run = json.loads((folder / DISTILL_SUMMARY).read_text())
    if run["evaluated_with"] == "own classifier":
        return run["test_top1"]
    return json.loads((folder / PROBE_SUMMARY).read_text())["test_top1"]


@pytest.mark.slow
def test_sweep_reuses_the_main_runs_and_tables_the_runs_own_results(scored_store, tmp_path):
    out = tmp_path / "report"
    run_cli("report", "--config", _config(tmp_path, scored_store))  # the main runs, at 0.25
    main_weights = {e: (out / e / "seed-0" / STUDENT_WEIGHTS).stat().st_mtime_ns for e in ("ce", "feature")}
    assert not (out / REPORT_BUDGET_PLOT).exists()
    assert "sweep" not in json.loads((out / REPORT_SUMMARY).read_text())

    result = run_cli("report", "--config", _config(tmp_path, scored_store, label_fractions=[0.5, 0.25]))
    for entry, mtime in main_weights.items():  # the run at the main fraction is the main table's, not redone
        assert (out / entry / "seed-0" / STUDENT_WEIGHTS).stat().st_mtime_ns == mtime
        assert not (out / entry / "labels-0.25").exists() and (out / entry / "labels-0.5" / "seed-0").is_dir()
    sweep = json.loads((out / REPORT_SUMMARY).read_text())["sweep"]
    assert sweep["label_fractions"] == [0.25, 0.5] and sweep["main_label_fraction"] == 0.25
    text = (out / REPORT_TEXT).read_text()
    folders = {0.25: lambda e: out / e / "seed-0", 0.5: lambda e: out / e / "labels-0.5" / "seed-0"}
    summary_row = {"ce": "| ce |", "feature": "| feature |"}
    for table, labelled in zip(sweep["fractions"], (100, 200), strict=True):
        fraction = table["label_fraction"]
        assert table["num_labelled"] == labelled and f"Label fraction {fraction:g}: {labelled} labelled" in text
        assert [r["method"] for r in table["methods"]] == ["ce", "feature"]
        for row in table["methods"]:
            folder = folders[fraction](row["method"])
            assert json.loads((folder / DISTILL_SUMMARY).read_text())["label_fraction"] == fraction
            assert row["top1"] == [_own_top1(folder)] and row["mean"] == _own_top1(folder) and row["std"] == 0.0
            assert f"| {row['mean']:.2f} ± 0.00 (n=1) |" in text
            summary_row[row["method"]] += f" {row['mean']:.2f} ± 0.00 |"
        ce, feature = table["methods"]
        assert ce["gain"] == 0.0 and feature["gain"] == pytest.approx(feature["mean"] - ce["mean"])
    assert "| method | 0.25 (100 labelled) | 0.5 (200 labelled) |" in text
    assert all(row in text and row in result.output for row in summary_row.values()), summary_row
    assert (out / REPORT_BUDGET_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({REPORT_BUDGET_PLOT})" in text


@pytest.mark.parametrize(
    "fractions,fragments",
    [
        ("0.25,0.02", ["--label-fractions 0.02 (ce, seed 0): cannot draw a class-stratified 0.02 of 400 samples"]),
        ("0.5,1.5", ["--label-fractions", "'0.5,1.5' is not a comma-separated list of fractions in (0, 1]"]),
        ("0", ["--label-fractions", "'0' is not a comma-separated list of fractions in (0, 1]"]),
    ],
)
def test_a_fraction_that_cannot_run_fails_before_any_run(scored_store, tmp_path, fractions, fragments):
    config = _config(tmp_path, scored_store)
    result = run_cli("report", "--config", config, "--label-fractions", fractions, expect_ok=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "report" / "ce").exists()
