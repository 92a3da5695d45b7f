"""distill and probe on a small digits store: no label reaches the backbone, resume is exact, the pipeline learns."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from cache.reader import CachedTargets
from cache.schema import STORE_NAME
from cache.store import FeatureStore
from helpers import STUDENT, assert_one_line_error, interrupted_in_epoch, run_cli, weights
from pipeline import DistillConfig, ExtractConfig, ProbeConfig, distill, extract, load_classifier, probe
from pipeline.data.datasets import Preprocessing, load_split
from pipeline.engine.checkpoints import read_model_spec, save_checkpoint
from pipeline.errors import UserError
from pipeline.layout import DISTILL_LOG, DISTILL_SUMMARY, STUDENT_WEIGHTS
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import create_model

LABEL_BUDGET = {"label_fraction": 0.25, "steps": 10}


def test_cached_targets_in_ram_and_streamed_agree(scored_store):
    part = FeatureStore.open(scored_store).split("train")
    assert part.num_blocks > 2
    full = [part.feature(t)[:] for t in ("layer2.2", "layer3.2")]
    for memory in (1 << 40, 0):
        targets = CachedTargets(part, ["features/layer2.2", "features/layer3.2"], memory, window=2)
        assert targets.in_memory == bool(memory)
        windows = targets.epoch_order(np.random.default_rng(0))
        seen = []
        for rows, _, values in targets.batches(windows, 50):
            for k in range(2):
                np.testing.assert_array_equal(values[k], full[k][rows])
            seen.append(rows)
        seen = np.concatenate(seen)
        assert len(seen) == 400 and len(np.unique(seen)) == 400
        if not memory:  # streamed: each window holds whole blocks, so the first 2 blocks' rows come first
            first_blocks = np.unique(seen[: 2 * part.block_rows] // part.block_rows)
            assert len(first_blocks) == 2


@pytest.mark.parametrize(
    "method,extra",
    [
        ("feature", {}),
        # the other two CI only, to keep `make test-fast` under a minute
        pytest.param("feature-standard", {"student_layers": ("layer2.0", "layer3.0")}, marks=pytest.mark.slow),
        pytest.param("feature", LABEL_BUDGET, marks=pytest.mark.slow),
    ],
)
def test_labels_and_logits_never_reach_the_backbone(scored_store, tmp_path, method, extra):
    """Permuting every label and logit of the store changes no weight of a feature-only student (even with a
    label budget, where labels only pick the probe's subset)."""
    args = {**STUDENT, "method": method, **extra}
    summary = distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "a"), **args))
    assert summary["teacher_taps"] == ["layer2.2", "layer3.2"] and "test_top1" not in summary
    permuted = tmp_path / "permuted"
    shutil.copytree(scored_store, permuted)
    group = zarr.open_group(str(permuted / STORE_NAME), mode="r+")
    rng = np.random.default_rng(0)
    group["train/labels"][:] = rng.permutation(group["train/labels"][:])
    group["train/logits"][:] = rng.permutation(group["train/logits"][:])
    distill(DistillConfig(store=str(permuted), out=str(tmp_path / "b"), **args))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    fresh = create_model("resnet8", 10, model_kwargs={"base_width": 8}).state_dict()
    assert not torch.equal(a["layer3.0.conv1.weight"], fresh["layer3.0.conv1.weight"])  # distilled
    assert torch.equal(a["fc.weight"], fresh["fc.weight"])  # after the last tap: never trained


@pytest.mark.slow  # CI only, to keep `make test-fast` under a minute
def test_resume_after_interruption_is_exact(scored_store, tmp_path, monkeypatch):
    args = {**STUDENT, "epochs": 3, "cache_memory_gb": 0.0, "checkpoint_seconds": 0.0}  # streamed, every epoch
    distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "whole"), **args))
    with interrupted_in_epoch(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "cut"), **args))
    assert not (tmp_path / "cut" / STUDENT_WEIGHTS).exists()
    assert len((tmp_path / "cut" / DISTILL_LOG).read_text().splitlines()) == 1 + 2  # written every epoch
    summary = distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "cut"), resume=True, **args))
    assert summary["final"]["epoch"] == 3 and summary["targets"] == "cache streamed"
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert len(list((tmp_path / "cut").glob("epoch-*.state.pt"))) == 2  # the two latest are kept
    # Targets in RAM would give another sample order: such a resume is refused with the setting named.
    in_ram = {**args, "cache_memory_gb": 4.0}
    with pytest.raises(UserError, match="target_order = 'streamed, .*', not 'in RAM'"):
        distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "cut"), resume=True, **in_ram))


def test_pipeline_learns_and_exports_a_classifier(scored_store, tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        "distill",
        scored_store,
        "--student",
        "resnet8",
        "--model-kwargs",
        "{base_width: 8}",
        "--epochs",
        4,
        "--batch-size",
        64,
        "--lr",
        0.01,
        "--device",
        "cpu",
        "--out",
        run,
    )
    assert "layer2.0->layer2.2" in result.output and "layer3.0->layer3.2" in result.output
    summary = probe(ProbeConfig(run=str(run), device="cpu"))
    assert summary["test_top1"] > 60.0  # chance is 10 %
    correct = round(summary["test_top1"] * summary["num_test"] / 100)
    assert summary["test_top1"] == 100 * correct / summary["num_test"]  # a count over the test split, exactly
    classifier = load_classifier(run)
    test = load_split("digits", "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        accuracy = 100 * (classifier(images).argmax(1).numpy() == test.labels).mean()
    assert accuracy == pytest.approx(summary["test_top1"], abs=0.3)
    raw = test.images.images[0]  # a uint8 (3, 8, 8) image, as stored
    assert classifier(classifier.transform(raw)[None]).argmax().item() == classifier(images[:1]).argmax().item()
    assert "student" in run_cli("summary", tmp_path).output


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--student-layers", "layer9.9"], "unknown tap 'layer9.9'"),
        (
            ["--student-layers", "layer3.0", "--teacher-layers", "layer2.2,layer3.2"],
            "--student-layers names 1 taps for 2 teacher",
        ),
        (["--teacher-layers", "pool"], "teacher tap 'pool' is not in"),
        (["--dataset", "cifar10"], "was extracted from dataset 'digits', not 'cifar10'"),
        (["--batch-size", "1000"], "exceeds the 400 training samples"),
        # fine, a whole run that only checks it runs: CI only, to keep `make test-fast` under a minute
        pytest.param(["--student", "resnet9", "--student-layers", "layer1.0,layer2.0"], None, marks=pytest.mark.slow),
    ],
)
def test_bad_input(scored_store, tmp_path, extra, fragment):
    args = [
        "distill",
        scored_store,
        "--student",
        "resnet8",
        "--epochs",
        1,
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
        *extra,
    ]
    if fragment is None:
        run_cli(*args, "--batch-size", 200)
        return
    assert_one_line_error(run_cli(*args, expect_ok=False), fragment)
    assert not (tmp_path / "run" / STUDENT_WEIGHTS).exists()


def test_mismatched_store_and_foreign_checkpoint(scored_store, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(scored_store, tampered)
    group = zarr.open_group(str(tampered / STORE_NAME), mode="r+")
    group["train"].attrs["fingerprint"] = "0" * 64
    result = run_cli("distill", tampered, "--device", "cpu", "--out", tmp_path / "x", expect_ok=False)
    assert_one_line_error(result, "data fingerprint differs")
    base = ["distill", scored_store, "--epochs", 1, "--batch-size", 200, "--device", "cpu", "--out", tmp_path / "run"]
    run_cli(*base, "--student", "resnet8")
    assert_one_line_error(run_cli(*base, "--student", "resnet8", expect_ok=False), "already holds a distill run")
    result = run_cli(*base, "--student", "resnet20", "--resume", expect_ok=False)
    assert_one_line_error(result, "made with student = 'resnet8', not 'resnet20'")
    assert_one_line_error(run_cli("probe", tmp_path / "x", expect_ok=False), "holds no distilled student")


def test_unscored_store_needs_teacher_layers(digits_teacher, tmp_path):
    config = ExtractConfig(
        out=str(tmp_path / "s"),
        checkpoint=digits_teacher["checkpoint"],
        layers=("layer3.2",),
        max_samples=100,
        device="cpu",
    )
    extract(config)
    result = run_cli("distill", tmp_path / "s", "--device", "cpu", "--out", tmp_path / "r", expect_ok=False)
    assert_one_line_error(result, "no scores", "--teacher-layers")


@pytest.mark.slow
def test_online_teacher_matches_the_cache(scored_store, digits_teacher, tmp_path):
    """Online targets equal the cached ones to float16 precision, so both modes train alike."""
    from pipeline.engine.provenance import load_matching_split
    from pipeline.engine.training import OnlineTeacher

    store = FeatureStore.open(scored_store)
    part = store.split("train")
    teacher = OnlineTeacher.from_store(store, ["layer2.2", "layer3.2"], None, 10, 32)
    data = load_matching_split(store, "train", None, None)
    rows = np.arange(0, 400, 7)
    images = torch.stack([data[int(i)][0] for i in part.array("indices")[rows]])
    for tap in ["layer2.2", "layer3.2"]:
        online = teacher(images)[f"features/{tap}"]
        np.testing.assert_allclose(online.numpy(), part.feature(tap)[rows].astype(np.float32), rtol=1e-3, atol=1e-3)
    cached = distill(DistillConfig(store=str(scored_store), out=str(tmp_path / "cached"), **STUDENT))
    online = distill(
        DistillConfig(store=str(scored_store), out=str(tmp_path / "online"), online_teacher=True, **STUDENT)
    )
    assert online["targets"] == "online teacher"
    assert online["final"]["feature_mse"] == pytest.approx(cached["final"]["feature_mse"], rel=1e-2)
    other = tmp_path / "other.safetensors"
    shutil.copy(digits_teacher["checkpoint"], other)
    with open(other, "ab") as f:
        f.write(b" ")
    result = run_cli(
        "distill",
        scored_store,
        "--online-teacher",
        "--teacher-checkpoint",
        other,
        "--device",
        "cpu",
        "--out",
        tmp_path / "x",
        expect_ok=False,
    )
    assert_one_line_error(result, "is not the checkpoint")


def test_student_and_probe_see_the_pixels_the_store_records(tmp_path):
    """A store extracted with a timm teacher's own preprocessing: the student trains on it, the probe embeds with
    it and exports it as the classifier's transform, and without the store the run's record gives the same."""
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(create_model("timm:test_resnet", 10), teacher, ModelSpec("timm:test_resnet", 10))
    store = tmp_path / "store"
    extract(
        ExtractConfig(
            teacher="timm:test_resnet", checkpoint=str(teacher), max_samples=100, device="cpu", out=str(store)
        )
    )
    recorded = FeatureStore.open(store).meta["identity"]["dataset"]["preprocessing"]
    assert recorded != load_split("digits", "train").preprocessing.to_dict()  # the model's, not the dataset's
    run = tmp_path / "run"
    args = {**STUDENT, "epochs": 1, "batch_size": 50, "teacher_layers": ("layer2.0",)}
    distill(DistillConfig(store=str(store), out=str(run), **args))
    assert read_model_spec(run / STUDENT_WEIGHTS).preprocessing == recorded
    with_store = probe(ProbeConfig(run=str(run), device="cpu"))
    raw = load_split("digits", "test").images.images[0]
    expected = Preprocessing.from_dict(recorded).transform()(raw)
    assert torch.equal(load_classifier(run).transform(raw), expected)
    shutil.rmtree(store)
    without_store = probe(ProbeConfig(run=str(run), device="cpu"))
    assert without_store["test_top1"] == with_store["test_top1"]
    assert torch.equal(load_classifier(run).transform(raw), expected)


def write_image_folder(root, per_class: dict[str, int]) -> None:
    """A tiny imagefolder dataset: PNGs of a colour per class, `per_class[split]` images of each class."""
    from PIL import Image

    for split, count in per_class.items():
        for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
            (root / split / f"class{c}").mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (40, 30), tuple(v + 5 * k for v in colour)).save(
                    root / split / f"class{c}" / f"{k}.png"
                )


def test_distill_and_probe_find_the_data_where_extract_read_it(tmp_path, monkeypatch):
    """The store records its data root (absolute, beside the identity, not in it); distill reads the data from there
    and records it for probe; data moved since is one line asking for --data-root, and a root given wins."""
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "images", {"train": 8, "val": 3})
    teacher = create_model("resnet8", 3, model_kwargs={"base_width": 4})
    save_checkpoint(teacher, tmp_path / "teacher.safetensors", ModelSpec("resnet8", 3))
    extract = ["extract", "--teacher", "resnet8", "--model-kwargs", "{base_width: 4}", "--dataset", "imagefolder"]
    extract += ["--checkpoint", "teacher.safetensors", "--input-size", 32, "--layers", "layer3.0", "--device", "cpu"]
    run_cli(*extract, "--data-root", "images", "--out", "store")
    store = FeatureStore.open("store")
    assert store.meta["data_root"] == str(tmp_path / "images") and "data_root" not in json.dumps(store.meta["identity"])
    distill = ["distill", "store", "--teacher-layers", "layer3.0", "--student", "resnet8", "--model-kwargs"]
    distill += ["{base_width: 4}", "--batch-size", 8, "--epochs", 1, "--device", "cpu"]
    probe = ["probe", "run", "--max-iter", 20, "--device", "cpu"]
    run_cli(*distill, "--out", "run")
    assert json.loads((tmp_path / "run" / DISTILL_SUMMARY).read_text())["data_root"] == str(tmp_path / "images")
    assert run_cli(*probe).exit_code == 0
    (tmp_path / "images").rename(tmp_path / "moved")
    gone = f"records data root {tmp_path / 'images'}, which no longer exists; pass --data-root"
    assert_one_line_error(run_cli(*distill, "--out", "run-2", expect_ok=False), f"store/{STORE_NAME} {gone}")
    assert_one_line_error(run_cli(*probe, expect_ok=False), f"run {gone}")
    run_cli(*distill, "--data-root", "moved", "--out", "run-2")
    assert run_cli(*probe, "--data-root", "moved").exit_code == 0


def test_top1_is_exact_from_the_counts():
    """27 of 30 right is 90.0, not float32's 89.99999761581421."""
    from pipeline.stages.probe import _top1

    labels = torch.arange(30) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float()
    logits[:3] = logits[:3].roll(1, dims=1)  # the first 3 wrong
    assert _top1(logits, labels) == 90.0
    assert 100 * (logits.argmax(1) == labels).float().mean().item() != 90.0  # what a float32 mean gives


def test_probe_warns_when_the_embedding_is_constant(scored_store, tmp_path, caplog):
    """A student whose convolutions are all zero computes the same features for every image: the probe says so,
    naming the tap, and lands at the majority class's share."""
    run = tmp_path / "run"
    distill(DistillConfig(store=str(scored_store), out=str(run), **{**STUDENT, "steps": 1}))
    student = create_model("resnet8", 10, model_kwargs=STUDENT["model_kwargs"])
    for module in student.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.bias)  # constant, but not zero
    save_checkpoint(student, run / STUDENT_WEIGHTS, read_model_spec(run / STUDENT_WEIGHTS))
    with caplog.at_level("WARNING", logger="pipeline.stages.probe"):
        summary = probe(ProbeConfig(run=str(run), device="cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = "barely varies across images (relative spread 0): the probe can only reach chance"
    assert warnings == [f"embedding at {summary['tap']} {expected}"]
    assert summary["test_top1"] <= 100 * np.bincount(load_split("digits", "test").labels).max() / summary["num_test"]
