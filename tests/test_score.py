"""`kdpipe score` on stores: agrees with the reference on the cached values, is deterministic, reads out of core."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from cache.store import FeatureStore
from helpers import assert_one_line_error, make_store, naive_quality, run_cli, small_chunks
from pipeline import ExtractConfig, ScoreConfig, extract, score
from pipeline.distillation.quality import draw_subsets


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Three taps over 4 classes: a map, tokens and a vector, with class structure that sharpens with depth."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 240)
    labels[:4] = np.arange(4)
    centres = rng.standard_normal((4, 64))

    def tap(spread, shape):
        x = centres[labels] + spread * rng.standard_normal((len(labels), 64))
        return x.reshape(len(labels), *shape).astype(np.float16)

    features = {"early": tap(3.0, (4, 4, 4)), "middle": tap(1.0, (8, 8)), "late": tap(0.3, (64,))}
    path = tmp_path_factory.mktemp("syn") / "features.zarr"
    make_store(path, features, labels, dataset_size=1000)
    return path, features, labels


def test_matches_reference_on_cached_values(synthetic):
    path, features, labels = synthetic
    summary = score(ScoreConfig(store=str(path), seed=3, top_k=2, plot=False))
    a, b = draw_subsets(labels, 4, 3)
    for tap in summary["taps"]:
        x = features[tap["name"]].astype(np.float32).reshape(len(labels), -1)
        expected = naive_quality(x, labels, a, b, n_train=1000)
        for key in ("S", "I", "E", "Q"):
            assert tap[key] == pytest.approx(expected[key], rel=1e-5), (tap["name"], key)
    best = sorted(summary["taps"], key=lambda t: -t["Q"])[:2]
    assert summary["selected"] == [t["name"] for t in sorted(best, key=lambda t: t["index"])]
    per_class_b = np.minimum(np.bincount(labels), 240 // 4)  # B: min(500, floor(N / C)) per class
    assert summary["subset_sizes"] == {"A": 240, "B": int(per_class_b.sum())}


def test_records_scores_everywhere(synthetic):
    path, _, _ = synthetic
    result = run_cli("score", path.parent, "--top-k", "1", "--seed", "1")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["idx", "tap", "D"], result.stdout
    marked = [line.split()[2] for line in lines[1:4] if line.startswith("*")]
    summary = json.loads((path.parent / "scores.json").read_text())
    assert marked == summary["selected"] and len(marked) == 1
    assert (path.parent / "scores.png").stat().st_size > 10_000
    attrs = zarr.open_group(str(path), mode="r")["train"].attrs["scores"]
    assert attrs["selected"] == summary["selected"] and set(attrs["Q"]) == {"early", "middle", "late"}
    assert (path.parent / "score_args.yaml").is_file()
    assert f"scores: {path.parent / 'scores.json'}  plot: {path.parent / 'scores.png'}" in result.stdout


def test_stores_sharing_a_folder_keep_their_scores_and_summary_shows_only_current_ones(synthetic, tmp_path):
    path, _, _ = synthetic
    shutil.copytree(path, tmp_path / "features.zarr")
    shutil.copytree(path, tmp_path / "other.zarr")
    run_cli("score", tmp_path, "--top-k", "1")
    standard = (tmp_path / "scores.json").read_bytes()
    result = run_cli("score", tmp_path / "other.zarr", "--top-k", "2")
    assert f"scores: {tmp_path / 'other.scores.json'}  plot: {tmp_path / 'other.scores.png'}" in result.stdout
    assert (tmp_path / "other.score_args.yaml").is_file() and (tmp_path / "scores.json").read_bytes() == standard
    assert run_cli("summary", tmp_path).stdout.count("taps     top-") == 2
    FeatureStore.open(tmp_path / "other.zarr", mode="r+").update_meta(config_hash="rebuilt")
    old = {k: v for k, v in json.loads(standard).items() if k != "config_hash"}  # as older kdpipe wrote it
    (tmp_path / "scores.json").write_text(json.dumps(old))
    stale = "taps     {} is stale ({}); rerun kdpipe score"
    assert run_cli("summary", tmp_path).stdout.splitlines() == [
        stale.format(tmp_path / "other.scores.json", "its store was rebuilt with another configuration since"),
        stale.format(tmp_path / "scores.json", "written before kdpipe recorded which store it scored"),
    ]
    shutil.rmtree(tmp_path / "features.zarr")
    reason = (
        f"its store cannot be read: no feature store at {tmp_path / 'features.zarr'}; "
        f"`kdpipe extract --out {tmp_path}` makes one"
    )
    assert run_cli("summary", tmp_path).stdout.splitlines()[1] == stale.format(tmp_path / "scores.json", reason)


def test_deterministic_and_seeded(synthetic):
    path, _, _ = synthetic
    first = score(ScoreConfig(store=str(path), seed=7, plot=False, max_samples=120))
    second = score(ScoreConfig(store=str(path), seed=7, plot=False, max_samples=120))
    other = score(ScoreConfig(store=str(path), seed=8, plot=False, max_samples=120))
    assert [t["Q"] for t in first["taps"]] == [t["Q"] for t in second["taps"]]
    assert [t["Q"] for t in first["taps"]] != [t["Q"] for t in other["taps"]]
    assert first["num_samples"] == 120


def test_memory_budget_splits_subset_b_without_changing_scores(synthetic):
    path, _, _ = synthetic
    whole = score(ScoreConfig(store=str(path), seed=0, plot=False))
    one_class = 60 * 64 * 4 / 2**30  # about one class per read
    grouped = score(ScoreConfig(store=str(path), seed=0, plot=False, memory_gb=one_class))
    assert [t["Q"] for t in whole["taps"]] == pytest.approx([t["Q"] for t in grouped["taps"]], rel=1e-6)


def test_zero_norm_sample_ranks_last(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2), 20)
    good = (rng.standard_normal((40, 16)) + 3 * labels[:, None]).astype(np.float16)
    broken = good.copy()
    broken[5] = 0
    make_store(tmp_path / "features.zarr", {"broken": broken, "good": good}, labels)
    summary = score(ScoreConfig(store=str(tmp_path), top_k=1, plot=False))
    assert summary["selected"] == ["good"] and np.isnan(summary["taps"][0]["Q"])
    assert any("NaN" in note for note in summary["notes"])
    summary = score(ScoreConfig(store=str(tmp_path), top_k=5, plot=False))
    assert summary["selected"] == ["broken", "good"] and any("exceeds" in note for note in summary["notes"])


def _store_without_labels(tmp_path):
    store = make_store(tmp_path / "features.zarr", {"x": np.ones((8, 4), np.float16)}, np.arange(8) % 2)
    attrs = store.group["train"].attrs
    attrs["arrays"] = [a for a in attrs["arrays"] if a != "labels"]


@pytest.mark.parametrize(
    "case,args,fragment",
    [
        ("no labels", [], "has no labels"),
        ("unknown tap", ["--layers", "nope"], "tap 'nope' is not in"),
        ("incomplete", [], "is incomplete"),
        ("one class", [], "at least 2 classes"),
        ("no store", [], "no feature store"),
        ("singleton class", [], "fewer than 2 samples"),
    ],
)
def test_bad_input(tmp_path, case, args, fragment):
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float16)
    if case == "no labels":
        _store_without_labels(tmp_path)
    elif case == "incomplete":
        make_store(tmp_path / "features.zarr", {"x": x}, np.arange(8) % 2, complete=False)
    elif case == "one class":
        make_store(tmp_path / "features.zarr", {"x": x}, np.zeros(8))
    elif case == "singleton class":
        make_store(tmp_path / "features.zarr", {"x": x}, [0, 0, 0, 0, 0, 0, 0, 1])
    elif case != "no store":
        make_store(tmp_path / "features.zarr", {"x": x}, np.arange(8) % 2)
    assert_one_line_error(run_cli("score", tmp_path, *args, expect_ok=False), fragment)
    assert not (tmp_path / "scores.json").exists()


@pytest.mark.slow
def test_digits_teacher_peaks_late(trained_teacher, tmp_path):
    """On the trained digits teacher, Q is highest in the last stage (as the paper's deep picks)."""
    config = ExtractConfig(
        out=str(tmp_path),
        checkpoint=trained_teacher["checkpoint"],
        layers=("stem", "layer1.2", "layer2.2", "layer3.2"),
        max_samples=400,
        device="cpu",
    )
    extract(config)
    summary = score(ScoreConfig(store=str(tmp_path), top_k=1, plot=False))
    assert summary["selected"] == ["layer3.2"]
    assert FeatureStore.open(tmp_path).split("train").group.attrs["scores"]["selected"] == ["layer3.2"]


def test_missing_chunk_reads_as_nan_not_zeros(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(2), 40)
    x = (rng.standard_normal((80, 1024, 16)) + labels[:, None, None]).astype(np.float16)  # 32 KiB rows
    with small_chunks():
        make_store(tmp_path / "features.zarr", {"x": x}, labels)
    chunk = next((tmp_path / "features.zarr" / "train" / "features" / "x" / "c").iterdir())
    assert FeatureStore.open(tmp_path).split("train").feature("x").chunks[0] < 80
    import shutil

    shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()
    assert_one_line_error(run_cli("score", tmp_path, expect_ok=False), "a chunk of train/features/x is missing")


def test_max_samples_below_two_per_class(synthetic):
    path, _, _ = synthetic
    assert_one_line_error(run_cli("score", path, "--max-samples", 5, expect_ok=False), "at least 2 samples")
