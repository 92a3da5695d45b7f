"""The two-pass route for large datasets: every tap of a sample scored, then only the picked taps cached for every
image, and distill taking the picks the second store records."""

from __future__ import annotations

import json

import pytest

from cache.store import FeatureStore
from helpers import assert_one_line_error, run_cli
from pipeline import DistillConfig, ExtractConfig, ScoreConfig, distill, extract, score
from pipeline.engine.checkpoints import save_checkpoint
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import create_model

pytestmark = pytest.mark.slow  # whole extract, score and distill runs


@pytest.fixture(scope="module")
def sample_store(digits_teacher, tmp_path_factory):
    """Every tap of 200 training images, scored (top 3)."""
    out = tmp_path_factory.mktemp("sample")
    extract(ExtractConfig(out=str(out), checkpoint=digits_teacher["checkpoint"], max_samples=200, device="cpu"))
    return out, score(ScoreConfig(store=str(out), top_k=3, plot=False))


def test_second_pass_caches_the_picks_for_every_image_and_distill_uses_them(digits_teacher, sample_store, tmp_path):
    sample, scores = sample_store
    full = FeatureStore.open(sample).meta["identity"]["dataset"]["splits"]["train"]["size"]
    assert scores["num_samples"] == 200 and scores["n_train"] == full > 200  # K counts the whole split (quirk 8)
    out = tmp_path / "picked"
    extract(
        ExtractConfig(out=str(out), checkpoint=digits_teacher["checkpoint"], layers=(f"picked:{sample}",), device="cpu")
    )
    store = FeatureStore.open(out)
    assert [t["name"] for t in store.meta["identity"]["taps"]] == scores["selected"]
    assert store.split("train").num_samples == full
    assert store.meta["picked_by"]["selected"] == scores["selected"]
    assert store.meta["picked_by"]["scores"] == str(sample / "scores.json")
    assert "scores" not in store.split("train").group.attrs  # the second store was never scored itself
    assert f"picked by   {sample / 'scores.json'}" in run_cli("info", out).output
    summary = distill(
        DistillConfig(store=str(out), student="resnet8", epochs=1, out=str(tmp_path / "run"), device="cpu")
    )
    assert summary["teacher_taps"] == scores["selected"]
    fewer = distill(
        DistillConfig(
            store=str(out), student="resnet8", epochs=1, student_layers=("layer2.0", "layer3.0"),
            out=str(tmp_path / "two"), device="cpu",
        )
    )  # fmt: skip
    q = {t["name"]: t["Q"] for t in scores["taps"]}
    assert sorted(fewer["teacher_taps"], key=q.get, reverse=True) == sorted(scores["selected"], key=q.get)[::-1][:2]


def test_scores_file_and_stage_ends_name_the_taps(digits_teacher, sample_store, tmp_path):
    sample, scores = sample_store
    ends = FeatureStore.open(sample).meta["identity"]["teacher"]["stage_ends"]
    out = tmp_path / "baselines"
    layers = f"picked:{sample / 'scores.json'},stage-ends"
    run_cli(
        "extract", "--checkpoint", digits_teacher["checkpoint"], "--layers", layers, "--max-samples", 120, "--out", out
    )
    taps = FeatureStore.open(out).meta["identity"]["taps"]
    assert [t["name"] for t in taps] == [t["name"] for t in sorted(taps, key=lambda t: t["index"])]  # depth order
    assert sorted(t["name"] for t in taps) == sorted(set(scores["selected"] + ends))
    run = distill(
        DistillConfig(
            store=str(out), method="feature-standard", student="resnet8", epochs=1, batch_size=32,
            out=str(tmp_path / "r"), device="cpu",
        )
    )  # fmt: skip
    assert run["teacher_taps"] == ends[-3:]  # resnet8 has 3 stages


def test_picks_from_another_teacher_or_an_unscored_store_are_refused(digits_teacher, sample_store, tmp_path):
    sample, _ = sample_store
    other = tmp_path / "other.safetensors"
    save_checkpoint(create_model("resnet20", 10), other, ModelSpec("resnet20", 10))
    result = run_cli(
        "extract", "--checkpoint", other, "--layers", f"picked:{sample}", "--out", tmp_path / "x", expect_ok=False
    )
    assert_one_line_error(result, "scored on another teacher", "checkpoint_sha256")
    smaller = tmp_path / "resnet8.safetensors"  # another architecture: the picked taps may not exist in it
    save_checkpoint(create_model("resnet8", 10), smaller, ModelSpec("resnet8", 10))
    result = run_cli(
        "extract", "--teacher", "resnet8", "--checkpoint", smaller, "--layers", f"picked:{sample}",
        "--out", tmp_path / "z", expect_ok=False,
    )  # fmt: skip
    assert_one_line_error(result, "scored on another teacher", "name 'resnet20', here 'resnet8'")
    broken = tmp_path / "picks.json"  # a scores file by another name, cut short
    broken.write_text((sample / "scores.json").read_text()[:40])
    result = run_cli(
        "extract", "--checkpoint", other, "--layers", f"picked:{broken}", "--out", tmp_path / "b", expect_ok=False
    )
    assert_one_line_error(result, f"{broken} is not a readable kdpipe scores file")
    unscored = tmp_path / "unscored"
    extract(ExtractConfig(out=str(unscored), checkpoint=str(other), layers=("layer1.0",), max_samples=40))
    result = run_cli(
        "extract", "--checkpoint", other, "--layers", f"picked:{unscored}", "--out", tmp_path / "y", expect_ok=False
    )
    assert_one_line_error(result, "never scored", "kdpipe score")
    scores = json.loads((sample / "scores.json").read_text())
    assert scores["selected"]  # the sample's scores are untouched by the refusals
