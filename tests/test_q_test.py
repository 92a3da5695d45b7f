"""`kdpipe q-test`: one student per teacher tap and per tap set, probed, and the predictors' rank agreement with the
probed top-1, against the runs' own summaries, the scores file and naive rank statistics written here."""

from __future__ import annotations

import importlib
import itertools
import json
import math

import numpy as np
import pytest
import yaml

from helpers import assert_one_line_error, run_cli
from pipeline import ExtractConfig, ScoreConfig, extract, score
from pipeline.engine.training import Trainer
from pipeline.layout import DISTILL_SUMMARY, PROBE_SUMMARY, Q_TEST_PLOT, Q_TEST_SUMMARY, Q_TEST_TEXT, SCORES
from pipeline.stages.qtest import rank_agreement, top_pick

TAPS = ("stem", "layer1.2", "layer2.2", "layer3.2", "pool")


@pytest.fixture(scope="module")
def five_tap_store(digits_teacher, tmp_path_factory):
    """300 cached train samples of five taps from the stem to the flatten, scored with top-2."""
    out = tmp_path_factory.mktemp("q_test_store")
    extract(ExtractConfig(out=str(out), checkpoint=digits_teacher["checkpoint"], layers=TAPS, max_samples=300))
    score(ScoreConfig(store=str(out), top_k=2, plot=False))
    return out


def _config(tmp_path, store, **distill) -> str:
    path = tmp_path / "q.yaml"
    settings = {
        "student": "resnet8",
        "model_kwargs": {"base_width": 4},
        "student_layers": ["layer2.0", "layer3.0"],
        "steps": 3,
        "batch_size": 20,
        "label_fraction": 0.5,
        "device": "cpu",
        **distill,
    }
    config = {
        "q-test": {"store": str(store), "out": str(tmp_path / "q"), "seeds": [0], "random_sets": 1, "bootstrap": 200},
        "distill": settings,
        "probe": {"max_iter": 20, "device": "cpu"},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def naive_spearman(x, y) -> float:
    """Pearson correlation of the ranks (no ties in these tests)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def naive_kendall(x, y) -> float:
    """(concordant - discordant) / pairs, counted pair by pair (no ties in these tests)."""
    signs = [np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in itertools.combinations(range(len(x)), 2)]
    return float(sum(signs) / len(signs))


def test_rank_agreement_against_naive_statistics():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=9), rng.normal(size=9)
    got = rank_agreement(list(x), list(y), resamples=500, seed=0)
    assert got["spearman"]["value"] == pytest.approx(naive_spearman(x, y), abs=1e-12)
    assert got["kendall"]["value"] == pytest.approx(naive_kendall(x, y), abs=1e-12)
    for stat in ("spearman", "kendall"):
        assert -1 <= got[stat]["low"] <= got[stat]["high"] <= 1
    # A monotone predictor agrees perfectly in every resample; a reversed one disagrees perfectly.
    rising = rank_agreement(list(range(6)), [1.0, 2.0, 4.0, 8.0, 9.0, 9.5], resamples=200, seed=0)
    assert rising["spearman"] == pytest.approx({"value": 1.0, "low": 1.0, "high": 1.0})
    assert rising["kendall"]["value"] == pytest.approx(1.0)
    falling = rank_agreement(list(range(6)), [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], resamples=200, seed=0)
    assert falling["spearman"]["value"] == pytest.approx(-1.0) and falling["kendall"]["high"] == pytest.approx(-1.0)
    # A NaN predictor value drops that tap; the interval is seeded.
    with_nan = rank_agreement([math.nan, *x[1:]], list(y), resamples=500, seed=0)
    assert with_nan["taps"] == 8 and with_nan["spearman"]["value"] == pytest.approx(naive_spearman(x[1:], y[1:]))
    assert rank_agreement(list(x), list(y), resamples=500, seed=0) == got


def test_top_pick_takes_the_largest_finite_value_and_the_shallower_of_ties():
    assert top_pick([0.2, math.nan, 0.9, 0.9, 0.1]) == 2
    assert top_pick([math.nan, 0.1]) == 1


def test_q_test_runs_every_tap_and_set_and_tables_their_own_results(five_tap_store, tmp_path, monkeypatch):
    config = _config(tmp_path, five_tap_store)
    result = run_cli("q-test", "--config", config)
    out = tmp_path / "q"
    summary = json.loads((out / Q_TEST_SUMMARY).read_text())
    scores = {t["name"]: t for t in json.loads((five_tap_store / SCORES).read_text())["taps"]}
    selected = json.loads((five_tap_store / SCORES).read_text())["selected"]

    # One run per tap: that tap alone into the probed student layer, probed there.
    rows = summary["taps"]
    assert [r["tap"] for r in rows] == list(TAPS)
    for row in rows:
        folder = out / f"tap-{row['tap']}" / "seed-0"
        run = json.loads((folder / DISTILL_SUMMARY).read_text())
        probed = json.loads((folder / PROBE_SUMMARY).read_text())
        assert run["teacher_taps"] == [row["tap"]] and run["student_taps"] == ["layer3.0"]
        assert probed["tap"] == "layer3.0" and row["top1"] == [probed["test_top1"]] and row["std"] == 0.0
        assert row["Q"] == scores[row["tap"]]["Q"] and row["depth"] == scores[row["tap"]]["index"]

    # Each predictor against the naive statistics of the table's own numbers; the regret by hand.
    outcome = np.array([r["mean"] for r in rows])
    for name, stats in summary["predictors"].items():
        values = np.array([r[name] for r in rows])
        assert stats["spearman"]["value"] == pytest.approx(naive_spearman(values, outcome), abs=1e-12)
        assert stats["kendall"]["value"] == pytest.approx(naive_kendall(values, outcome), abs=1e-12)
        pick = int(np.argmax(values))
        assert stats["top_tap"] == TAPS[pick] and stats["regret"] == pytest.approx(outcome.max() - outcome[pick])
    assert summary["predictors"]["depth"]["top_tap"] == "pool"

    # The sets: Q's top 2 are score's picks, the stage ends the teacher's deepest two, Q's bottom the two lowest.
    sets = {s["set"]: s for s in summary["sets"]}
    assert list(sets) == ["q-top", "stage-ends", "random-1", "q-bottom"]
    assert sets["q-top"]["taps"] == selected and sets["stage-ends"]["taps"] == ["layer2.2", "layer3.2"]
    lowest = sorted(TAPS, key=lambda t: scores[t]["Q"])[:2]
    assert sets["q-bottom"]["taps"] == [t for t in TAPS if t in lowest]
    for name, row in sets.items():
        run = json.loads((out / f"set-{name}" / "seed-0" / DISTILL_SUMMARY).read_text())
        assert run["teacher_taps"] == row["taps"] and run["student_taps"] == ["layer2.0", "layer3.0"]
        assert row["top1"] == [json.loads((out / f"set-{name}" / "seed-0" / PROBE_SUMMARY).read_text())["test_top1"]]
    text = (out / Q_TEST_TEXT).read_text()
    assert "| depth (deeper is better) |" in text and f"]({Q_TEST_PLOT})" in text and "Kendall τ" in result.output
    assert (out / Q_TEST_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Run again: every run is reused (nothing trains, no probe is refitted) and the tables are the same.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(Trainer, "run_epoch", must_not_run)
    monkeypatch.setattr(importlib.import_module("pipeline.stages.probe"), "fit_linear", must_not_run)
    run_cli("q-test", "--config", config)
    again = json.loads((out / Q_TEST_SUMMARY).read_text())
    assert again["taps"] == rows and again["predictors"] == summary["predictors"] and again["sets"] == summary["sets"]


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--taps", "stem,layer9"], ["--taps: 'layer9' was not scored"]),
        (["--taps", "stem,pool"], ["at least 3 teacher taps"]),
    ],
)
def test_q_test_bad_input(five_tap_store, tmp_path, args, fragments):
    assert_one_line_error(
        run_cli("q-test", "--config", _config(tmp_path, five_tap_store), *args, expect_ok=False), *fragments
    )


def test_q_test_needs_scores_and_student_layers(digits_teacher, five_tap_store, tmp_path):
    unscored = tmp_path / "unscored"
    extract(ExtractConfig(out=str(unscored), checkpoint=digits_teacher["checkpoint"], layers=TAPS[:3], max_samples=50))
    result = run_cli("q-test", "--config", _config(tmp_path, unscored), expect_ok=False)
    assert_one_line_error(result, f"{unscored} has no scores.json; run `kdpipe score")
    result = run_cli("q-test", "--config", _config(tmp_path, five_tap_store, student_layers=[]), expect_ok=False)
    assert_one_line_error(result, "q-test needs the distill section's student_layers")
