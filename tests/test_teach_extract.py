"""teach reaches a sane accuracy; extract caches exactly what a fresh teacher forward gives, deterministically."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load_file

from cache.schema import STORE_NAME
from cache.store import FeatureStore
from helpers import run_cli, small_chunks
from pipeline import ExtractConfig, ScoreConfig, TeachConfig, extract, score, teach
from pipeline.data.datasets import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, load_split
from pipeline.engine.checkpoints import load_checkpoint, read_model_spec, save_checkpoint
from pipeline.engine.provenance import load_matching_split
from pipeline.layout import TEACH_LOG, TEACH_SUMMARY, TEACHER_WEIGHTS
from pipeline.models.spec import ModelSpec
from pipeline.models.taps import TapRecorder
from pipeline.models.zoo import create_model
from pipeline.stages.extract import HalfSlots


@pytest.mark.slow
def test_teach_reaches_ninety_percent(trained_teacher):
    assert trained_teacher["test_top1"] >= 90.0
    out = Path(trained_teacher["checkpoint"]).parent
    assert json.loads((out / TEACH_SUMMARY).read_text())["test_top1"] == trained_teacher["test_top1"]
    assert len((out / TEACH_LOG).read_text().splitlines()) == 1 + trained_teacher["epochs"]


def test_teach_writes_its_outputs(digits_teacher):
    out = Path(digits_teacher["checkpoint"]).parent
    assert json.loads((out / TEACH_SUMMARY).read_text())["test_top1"] == digits_teacher["test_top1"]
    assert len((out / TEACH_LOG).read_text().splitlines()) == 1 + digits_teacher["epochs"]
    assert yaml.safe_load((out / "teach_args.yaml").read_text())["epochs"] == digits_teacher["epochs"]
    digits = load_split("digits", "train").preprocessing.to_dict()  # a built-in model keeps the dataset's
    assert read_model_spec(digits_teacher["checkpoint"]).preprocessing == digits_teacher["preprocessing"] == digits


@pytest.mark.slow
def test_teach_check_changes_no_result(tmp_path, monkeypatch):
    """The dry forward before training (eval mode, random state kept) leaves the trained teacher bit-identical."""
    args = dict(teacher="resnet8", model_kwargs={"base_width": 4}, epochs=1, batch_size=256, device="cpu")
    teach(TeachConfig(out=str(tmp_path / "checked"), **args))
    monkeypatch.setattr(importlib.import_module("pipeline.stages.teach"), "dry_forward", lambda *args, **kwargs: None)
    teach(TeachConfig(out=str(tmp_path / "unchecked"), **args))
    checked, unchecked = (load_file(str(tmp_path / d / TEACHER_WEIGHTS)) for d in ("checked", "unchecked"))
    assert checked.keys() == unchecked.keys() and all(torch.equal(checked[k], unchecked[k]) for k in checked)


def _timm_preprocessing(name: str, mean=None, std=None) -> Preprocessing:
    """A timm model's eval preprocessing at 32 px, from its default pretrained config (mean/std unless given)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return Preprocessing(32, mean or cfg.mean, std or cfg.std, cfg.interpolation, cfg.crop_pct)


@pytest.mark.slow
def test_teach_serves_and_records_a_timm_models_preprocessing(tmp_path):
    summary = teach(TeachConfig(teacher="timm:test_resnet", epochs=1, batch_size=256, device="cpu", out=str(tmp_path)))
    expected = _timm_preprocessing("test_resnet").to_dict()
    assert expected["mean"] == [0.5, 0.5, 0.5] and expected["crop_pct"] < 1
    assert read_model_spec(summary["checkpoint"]).preprocessing == summary["preprocessing"] == expected
    extract_args = ["extract", "--teacher", "timm:test_resnet", "--checkpoint", summary["checkpoint"], "--splits"]
    extract_args += ["test", "--max-samples", 20, "--device", "cpu"]
    same = run_cli(*extract_args, "--out", tmp_path / "same")
    assert "trained with preprocessing" not in same.stderr
    other = run_cli(*extract_args, "--normalization", "dataset", "--out", tmp_path / "other")
    assert f"{summary['checkpoint']} was trained with preprocessing" in other.stderr


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory) -> Path:
    """A random-init timm:resnet18 (its class's pretrained config, no weights downloaded) with a kdpipe checkpoint."""
    path = tmp_path_factory.mktemp("timm") / "resnet18.safetensors"
    torch.manual_seed(0)
    save_checkpoint(create_model("timm:resnet18", 10, input_size=32), path, ModelSpec("timm:resnet18", 10))
    return path


@pytest.mark.parametrize("normalization", ["model", "dataset"])
def test_extract_records_the_preprocessing_it_serves(timm_teacher, tmp_path, normalization):
    """`model` serves a timm teacher its pretrained config's preprocessing (timm's resnet18: ImageNet mean and std,
    its crop_pct and interpolation), `dataset` the digits statistics; the store records what was served, the
    cached features are the teacher's on those pixels, and later stages load the split with the recorded one."""
    digits = load_split("digits", "test").preprocessing
    expected = _timm_preprocessing("resnet18", IMAGENET_MEAN, IMAGENET_STD) if normalization == "model" else digits
    config = ExtractConfig(
        teacher="timm:resnet18",
        checkpoint=str(timm_teacher),
        normalization=normalization,
        splits=("test",),
        layers=("layer2.1", "layer4.1"),
        max_samples=40,
        device="cpu",
        out=str(tmp_path),
    )
    extract(config)
    store = FeatureStore.open(tmp_path / STORE_NAME)
    assert store.meta["identity"]["dataset"]["preprocessing"] == expected.to_dict()
    assert load_matching_split(store, "test", None, None).preprocessing == expected
    _check_round_trip(tmp_path, "timm:resnet18", str(timm_teacher), split="test", preprocessing=expected)


def test_extract_warns_when_pretrained_weights_meet_another_size(caplog, monkeypatch, tmp_path):
    """timm's resnet18 weights were trained at 224 px; extracting them at 32 px is allowed, with a warning. The weights
    themselves are stood in for (nothing downloads): timm's loader is replaced by a no-op."""
    import timm.models._builder

    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *args, **kwargs: None)
    config = ExtractConfig(
        teacher="timm:resnet18", pretrained=True, layers=("layer4.1",), max_samples=20, device="cpu", out=str(tmp_path)
    )
    with caplog.at_level("WARNING"):
        extract(config)
    assert "the pretrained weights were trained at 224 px; extracting at 32 px" in caplog.text


def _check_round_trip(
    store_dir: Path, model_name: str, checkpoint: str, split: str = "train", preprocessing: Preprocessing | None = None
):
    """Every cached tap, label and logit equals a fresh eval forward of the teacher on the digits served with
    `preprocessing` (default: the dataset's own), to float16 precision."""
    store = FeatureStore.open(store_dir / STORE_NAME)
    part = store.split(split)
    indices = part.array("indices")[:]
    data = load_split("digits", split, preprocessing=preprocessing)
    model = create_model(model_name, data.num_classes, input_size=32)
    load_checkpoint(model, checkpoint)
    model.eval()
    images = torch.stack([data[int(i)][0] for i in indices])
    with torch.no_grad(), TapRecorder(model, part.tap_names) as rec:
        fresh = rec.run(images)
    for tap, expected in fresh.items():
        cached = part.feature(tap)[:].astype(np.float32)
        np.testing.assert_allclose(cached, expected.numpy(), rtol=1e-3, atol=1e-3, err_msg=tap)
    np.testing.assert_array_equal(part.array("labels")[:], data.labels[indices])
    np.testing.assert_allclose(part.array("logits")[:], rec.logits.numpy(), rtol=1e-5, atol=1e-5)


def test_extract_round_trip_cnn(digits_teacher, tmp_path):
    extract(ExtractConfig(out=str(tmp_path), checkpoint=digits_teacher["checkpoint"], max_samples=200, device="cpu"))
    _check_round_trip(tmp_path, "resnet20", digits_teacher["checkpoint"])
    summary = json.loads((tmp_path / "extract.json").read_text())
    train = summary["splits"]["train"]
    assert summary["complete"] and train["num_samples"] == 200
    assert 0 < train["stored_bytes"] < train["raw_bytes"]


def test_extract_round_trip_vit(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_tiny_cifar", 10, input_size=32)
    save_checkpoint(model, tmp_path / "vit.safetensors", ModelSpec("vit_tiny_cifar", 10))
    config = ExtractConfig(
        teacher="vit_tiny_cifar",
        out=str(tmp_path / "out"),
        checkpoint=str(tmp_path / "vit.safetensors"),
        splits=("test",),
        layers=("blocks.5", "embed", "blocks.0"),
        max_samples=64,
        device="cpu",
    )
    extract(config)
    part = FeatureStore.open(tmp_path / "out" / STORE_NAME).split("test")
    assert part.tap_names == ["embed", "blocks.0", "blocks.5"]  # depth order, whatever the request order
    assert part.feature("blocks.5").shape == (64, 65, 96)
    _check_round_trip(tmp_path / "out", "vit_tiny_cifar", str(tmp_path / "vit.safetensors"), split="test")


SMALL_STORE = dict(splits=("train", "test"), layers=("layer2.2", "layer3.2"), max_samples=300, device="cpu")


@pytest.fixture(scope="module")
def small_store(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    extract(ExtractConfig(out=str(out), checkpoint=digits_teacher["checkpoint"], **SMALL_STORE))
    return out


def test_extraction_is_deterministic(digits_teacher, small_store, tmp_path):
    config = ExtractConfig(out=str(tmp_path), checkpoint=digits_teacher["checkpoint"], batch_size=256, **SMALL_STORE)
    extract(config)
    first, second = zarr.open_group(str(small_store / STORE_NAME)), zarr.open_group(str(tmp_path / STORE_NAME))
    for split in ("train", "test"):
        for path in ("features/layer2.2", "features/layer3.2", "labels", "indices", "logits"):
            np.testing.assert_array_equal(first[f"{split}/{path}"][:], second[f"{split}/{path}"][:])
    assert first.attrs["kdpipe"]["config_hash"] == second.attrs["kdpipe"]["config_hash"]


def test_store_reads_with_plain_zarr_and_dask(small_store):
    script = f"""
import sys, zarr, dask.array as da
g = zarr.open_group({str(small_store / STORE_NAME)!r}, mode="r")
x = da.from_zarr(g["train/features/layer3.2"])
assert x.shape == (300, 64, 8, 8) and x.dtype == "float16", x
assert float(x.astype("float32").mean().compute()) > 0  # float16 sums overflow: upcast first
assert g["train/labels"][:].max() == 9 and g.attrs["kdpipe"]["complete"]
assert not any(m.split(".")[0] in ("pipeline", "cache") for m in sys.modules), "kdpipe was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def test_rerun_on_complete_store_does_nothing(digits_teacher, small_store):
    before = (small_store / STORE_NAME / "train" / "labels" / "zarr.json").stat().st_mtime_ns
    result = run_cli(
        "extract",
        "--teacher",
        "resnet20",
        "--checkpoint",
        digits_teacher["checkpoint"],
        "--splits",
        "train,test",
        "--layers",
        "layer2.2,layer3.2",
        "--max-samples",
        300,
        "--device",
        "cpu",
        "--out",
        small_store,
    )
    assert "already complete" in result.output
    assert (small_store / STORE_NAME / "train" / "labels" / "zarr.json").stat().st_mtime_ns == before


def test_interrupted_extraction_resumes(digits_teacher, small_store, tmp_path, monkeypatch):
    """A run that dies mid-split leaves done blocks flagged and the store incomplete; a rerun finishes it."""
    args = dict(checkpoint=digits_teacher["checkpoint"], batch_size=64, **SMALL_STORE)
    real_fill, calls = HalfSlots.fill, []

    def dying(self, features):
        calls.append(1)
        if len(calls) > 3:  # dies in the 4th batch, after at least one block is written
            raise KeyboardInterrupt
        return real_fill(self, features)

    monkeypatch.setattr(HalfSlots, "fill", dying)
    with small_chunks(), pytest.raises(KeyboardInterrupt):
        extract(ExtractConfig(out=str(tmp_path), **args))
    store = FeatureStore.open(tmp_path / STORE_NAME)
    assert not store.complete and not store.split("train").complete
    assert 0 < len(store.split("train").missing_blocks()) < store.split("train").num_blocks
    monkeypatch.setattr(HalfSlots, "fill", real_fill)
    extract(ExtractConfig(out=str(tmp_path), **args))
    resumed, reference = zarr.open_group(str(tmp_path / STORE_NAME)), zarr.open_group(str(small_store / STORE_NAME))
    assert resumed.attrs["kdpipe"]["complete"]
    for path in ("train/features/layer2.2", "train/features/layer3.2", "train/labels", "test/logits"):
        np.testing.assert_array_equal(resumed[path][:], reference[path][:])


def test_info_describes_the_store(small_store):
    text = run_cli("info", small_store).output
    assert "complete    yes" in text and "features/layer3.2" in text and "(300, 64, 8, 8)" in text
    assert "resnet20" in text and "split test" in text


def test_scoring_another_split_keeps_n_train_of_the_training_split(small_store):
    summary = score(ScoreConfig(store=str(small_store), split="test", top_k=1, plot=False))
    assert summary["num_samples"] == 300 and summary["n_train"] == 1437  # docs/method.md quirk 8: the whole train split
