"""Teacher checkpoints in the forms timm users have: each loads bit for bit, or is refused in one line naming the
file and the form; a head of another class count is dropped, and the store then says so and holds no logits."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import urllib.error
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from torch import nn

from cache.schema import STORE_NAME
from cache.store import FeatureStore
from helpers import TouchOnLoad, assert_one_line_error, run_cli
from pipeline.data.datasets import load_split
from pipeline.engine.checkpoints import LoadedWeights, load_checkpoint, save_checkpoint
from pipeline.errors import UserError
from pipeline.layout import DISTILL_SUMMARY, TEACHER_WEIGHTS
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import create_model, load_teacher

SMALL = {"base_width": 8}
SMALL_FLAG = "{base_width: 8}"


def small_resnet(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes, model_kwargs=SMALL)


def assert_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """The model holds exactly `expected`, bit for bit."""
    loaded = model.state_dict()
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def save_timm_training_checkpoint(path: Path, model: nn.Module, ema: nn.Module | None = None) -> Path:
    """What timm's train.py (its CheckpointSaver) writes: `args` as an argparse.Namespace, the optimizer's state,
    EMA weights when it keeps them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    contents = {
        "epoch": 3,
        "arch": "resnet8",
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "version": 2,
        "args": argparse.Namespace(model="resnet8", lr=0.1, epochs=4, model_kwargs=SMALL),
        "metric": 71.5,
    }
    if ema is not None:
        contents["state_dict_ema"] = ema.state_dict()
    torch.save(contents, path)
    return path


def extract_args(checkpoint: Path, out: Path, *extra, split: str = "test") -> list:
    return [
        "extract",
        "--teacher",
        "resnet8",
        "--model-kwargs",
        SMALL_FLAG,
        "--checkpoint",
        checkpoint,
        "--splits",
        split,
        "--max-samples",
        30,
        "--layers",
        "layer3.0,pool",
        "--device",
        "cpu",
        "--out",
        out,
        *extra,
    ]


def teacher_outputs(model: nn.Module, store_dir: Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, logits) of `model` on the store's cached samples."""
    indices = FeatureStore.open(store_dir / STORE_NAME).split(split).array("indices")[:]
    data = load_split("digits", split)
    images = torch.stack([data[int(i)][0] for i in indices])
    model.eval()
    with torch.no_grad():
        pooled = model.pool(model.forward_features(images))
        return pooled, model.fc(pooled)


def test_timm_training_checkpoint_loads_with_its_namespace_args(tmp_path):
    source = small_resnet(seed=1)
    path = save_timm_training_checkpoint(tmp_path / "checkpoint-3.pth.tar", source)
    with pytest.raises(pickle.UnpicklingError):  # the Namespace needs the allowance timm gives
        torch.load(path, weights_only=True)
    target = small_resnet(seed=2)
    assert load_checkpoint(target, path) == LoadedWeights("state_dict")
    assert_weights(target, source.state_dict())


def test_ema_weights_are_chosen_by_default_and_the_key_picks_others(tmp_path):
    trained, ema = small_resnet(seed=1), small_resnet(seed=3)
    path = save_timm_training_checkpoint(tmp_path / "model_best.pth.tar", trained, ema)
    target = small_resnet(seed=2)
    assert load_checkpoint(target, path).key == "state_dict_ema"
    assert_weights(target, ema.state_dict())
    assert load_checkpoint(target, path, key="state_dict").key == "state_dict"
    assert_weights(target, trained.state_dict())
    # The option reaches extract, and the store records the entry its teacher came from.
    run_cli(*extract_args(path, tmp_path / "store", "--checkpoint-key", "state_dict"))
    store = FeatureStore.open(tmp_path / "store" / STORE_NAME)
    assert store.meta["identity"]["teacher"]["checkpoint_key"] == "state_dict"
    _, logits = teacher_outputs(trained, tmp_path / "store")
    np.testing.assert_allclose(store.split("test").array("logits")[:], logits.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefixes", [("module.",), ("_orig_mod.",), ("_orig_mod.", "module.")])
def test_wrapper_prefixes_are_stripped(tmp_path, prefixes):
    source = small_resnet(seed=1)
    state = {"".join(prefixes) + k: v for k, v in source.state_dict().items()}
    if prefixes == ("module.",):
        assert list(state) == list(nn.DataParallel(source).state_dict())  # the keys DDP and DataParallel write
    torch.save(state, tmp_path / "wrapped.pt")
    target = small_resnet(seed=2)
    loaded = load_checkpoint(target, tmp_path / "wrapped.pt")
    assert loaded.key is None and set(loaded.stripped) == set(prefixes)
    assert_weights(target, source.state_dict())


def test_a_head_of_another_class_count_is_dropped(tmp_path, caplog):
    imagenet = small_resnet(1000, seed=1)
    torch.save({"state_dict": imagenet.state_dict()}, tmp_path / "imagenet.pth")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        torch.manual_seed(5)
        model, built = load_teacher("resnet8", str(tmp_path / "imagenet.pth"), False, SMALL, 10, 32)
    assert built.head == "dropped" and built.checkpoint_key == "state_dict" and built.model_kwargs == SMALL
    assert sum("1000-class head" in r.getMessage() for r in caplog.records) == 1
    fresh = small_resnet(10, seed=5)  # the same seed: the model's own initialisation, untouched
    assert model.fc.weight.shape == (10, 32)
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias)
    assert_weights(model, {**imagenet.state_dict(), "fc.weight": fresh.fc.weight, "fc.bias": fresh.fc.bias})
    # Strict otherwise: without the class count, or with any other mismatch (here the backbone's width).
    with pytest.raises(UserError, match=r"imagenet.pth does not match the model: 2 shape mismatches \(e.g. fc"):
        load_checkpoint(small_resnet(), tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match="imagenet.pth does not match the model"):
        load_teacher("resnet8", str(tmp_path / "imagenet.pth"), False, None, 10, 32)


def test_extract_with_a_dropped_head_caches_no_logits_and_kd_refuses(tmp_path):
    imagenet = small_resnet(1000, seed=1)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pt")
    result = run_cli(*extract_args(tmp_path / "imagenet.pt", tmp_path / "store", split="train"))
    assert "caching no logits" in result.output
    store = FeatureStore.open(tmp_path / "store" / STORE_NAME)
    teacher = store.meta["identity"]["teacher"]
    assert teacher["head"] == "dropped" and teacher["checkpoint_key"] is None and teacher["model_kwargs"] == SMALL
    assert store.meta["identity"]["logits"] is False
    part = store.split("train")
    assert "logits" not in part.group.attrs["arrays"]
    pooled, _ = teacher_outputs(imagenet, tmp_path / "store", "train")  # the backbone is the checkpoint's
    np.testing.assert_allclose(part.feature("pool")[:].astype(np.float32), pooled.numpy(), rtol=1e-3, atol=1e-3)
    distill = ["distill", tmp_path / "store", "--method", "kd", "--student", "resnet8", "--model-kwargs", SMALL_FLAG]
    result = run_cli(*distill, "--epochs", 1, "--device", "cpu", "--out", tmp_path / "run", expect_ok=False)
    assert_one_line_error(result, "--method kd reads logits", "head for another class count", "no logits")


def test_a_pickled_model_is_refused(tmp_path):
    """Named as a file of pickled objects by torch's own scan of it (whatever torch's error message says), never as
    a damaged download."""
    torch.save(small_resnet(), tmp_path / "model.pt")
    result = run_cli(*extract_args(tmp_path / "model.pt", tmp_path / "out"), expect_ok=False)
    classes = "pipeline.models.zoo.CifarResNet, timm.models.resnet.BasicBlock, torch.nn.modules.activation.ReLU"
    assert_one_line_error(result, "model.pt", f"pickled objects ({classes}, ... (10 in all))", "state_dict()")
    assert "damaged" not in result.output and "truncated" not in result.output


@pytest.mark.parametrize(
    "name,damage,form",
    [
        ("junk.pt", "junk", "as a torch file: not a file torch.save wrote"),
        ("cut.pth", "truncate", "as a torch file: its zip archive is damaged or truncated"),
        ("junk.safetensors", "junk", "as safetensors"),
        ("cut.safetensors", "truncate", "as safetensors"),
    ],
)
def test_unreadable_files_are_refused_naming_the_form(tmp_path, name, damage, form):
    path = tmp_path / name
    if damage == "junk":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        if path.suffix == ".safetensors":
            save_checkpoint(small_resnet(), path, ModelSpec("resnet8", 10))
        else:
            torch.save(small_resnet().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run_cli(*extract_args(path, tmp_path / "out"), expect_ok=False)
    assert_one_line_error(result, f"cannot read checkpoint {path} {form}")


def test_an_absent_checkpoint_key_is_refused_naming_it(tmp_path):
    path = save_timm_training_checkpoint(tmp_path / "last.pth.tar", small_resnet())
    result = run_cli(*extract_args(path, tmp_path / "out", "--checkpoint-key", "model_ema"), expect_ok=False)
    assert_one_line_error(
        result, "last.pth.tar has no entry 'model_ema'", "epoch, arch, state_dict, optimizer, version, args, metric"
    )


@pytest.mark.slow
def test_kwargs_of_a_taught_teacher_reach_the_store_and_its_stage_ends(tmp_path):
    """The teacher's checkpoint carries its model kwargs; extract without them records them, and feature-standard
    rebuilds that teacher for its stage ends."""
    teach = ["teach", "--teacher", "resnet8", "--model-kwargs", SMALL_FLAG, "--epochs", 1, "--batch-size", 256]
    run_cli(*teach, "--device", "cpu", "--out", tmp_path / "teacher")
    checkpoint = tmp_path / "teacher" / TEACHER_WEIGHTS
    extract = ["extract", "--teacher", "resnet8", "--checkpoint", checkpoint, "--max-samples", 256, "--device", "cpu"]
    run_cli(*extract, "--out", tmp_path / "store")
    teacher = FeatureStore.open(tmp_path / "store" / STORE_NAME).meta["identity"]["teacher"]
    assert teacher["model_kwargs"] == SMALL and teacher["head"] == "loaded" and teacher["checkpoint_key"] is None
    distill = ["distill", tmp_path / "store", "--method", "feature-standard", "--student", "resnet8", "--device", "cpu"]
    run_cli(*distill, "--model-kwargs", SMALL_FLAG, "--epochs", 1, "--batch-size", 64, "--out", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / DISTILL_SUMMARY).read_text())
    assert summary["teacher_taps"] == ["layer1.0", "layer2.0", "layer3.0"]
    assert [p["teacher_shape"] for p in summary["pairs"]] == [[8, 32, 32], [16, 16, 16], [32, 8, 8]]


@pytest.fixture
def no_torchvision_download(tmp_path, monkeypatch):
    """An empty torch hub cache and no network."""

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


def test_torchvision_weights_not_to_be_had_are_one_line(tmp_path, no_torchvision_download):
    args = ["extract", "--teacher", "tv:resnet18", "--pretrained", "--max-samples", 20, "--layers", "layer4"]
    result = run_cli(*args, "--device", "cpu", "--out", tmp_path / "out", expect_ok=False)
    assert_one_line_error(result, "pretrained weights of 'tv:resnet18' (ResNet18_Weights.IMAGENET1K_V1)", "cache")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the payload's protocol 4
def test_a_cached_torchvision_file_that_would_run_code_is_refused(tmp_path, no_torchvision_download):
    """torch hub's loader unpickles whatever its cache holds unless told weights_only=True: a cached weights file
    that creates a file when unpickled is refused in one line, and nothing of it ran."""
    import torchvision

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(pickle.dumps(TouchOnLoad(tmp_path / "ran")))
    args = ["extract", "--teacher", "tv:resnet18", "--pretrained", "--max-samples", 20, "--layers", "layer4"]
    result = run_cli(*args, "--device", "cpu", "--out", tmp_path / "out", expect_ok=False)
    assert_one_line_error(result, "pretrained weights of 'tv:resnet18'", f"{cached} is not plain weights", "delete it")
    assert not (tmp_path / "ran").exists()


def test_torchvision_pretrained_weights_fit_the_dataset_s_class_count(monkeypatch, no_torchvision_download):
    import torchvision

    torch.manual_seed(1)
    imagenet = create_model("tv:resnet18", 1000).state_dict()
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", lambda self, **kwargs: imagenet)
    torch.manual_seed(5)
    model, built = load_teacher("tv:resnet18", None, True, None, 10, 32)
    assert built.head == "dropped" and built.checkpoint_key is None
    torch.manual_seed(5)
    fresh = create_model("tv:resnet18", 10)
    assert model.fc.weight.shape == (10, 512)
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias)
    assert_weights(model, {**imagenet, "fc.weight": fresh.fc.weight, "fc.bias": fresh.fc.bias})


@pytest.mark.parametrize("damage", ["truncated state", "pickled state", "truncated weights"])
def test_resume_passes_over_a_damaged_newest_checkpoint_to_the_previous_good_one(
    damage, scored_store, tmp_path, caplog
):
    """A run killed in epoch 3 whose newest checkpoint (epoch 2) is damaged resumes from epoch 1, saying so, and ends
    with the uninterrupted run's weights; with every checkpoint damaged it is one Error line naming them."""
    from helpers import interrupted_in_epoch
    from pipeline import DistillConfig, distill
    from pipeline.layout import STUDENT_WEIGHTS, epoch_state, epoch_weights

    def config(out, **more):
        run = {"student": "resnet8", "model_kwargs": {"base_width": 8}, "batch_size": 100, "epochs": 3}
        return DistillConfig(store=str(scored_store), out=str(out), device="cpu", checkpoint_seconds=0.0, **run, **more)

    distill(config(tmp_path / "whole"))
    with pytest.MonkeyPatch.context() as patch, interrupted_in_epoch(patch, 3), pytest.raises(KeyboardInterrupt):
        distill(config(tmp_path / "cut"))
    cut = tmp_path / "cut"

    def spoil(epoch: int) -> None:
        state, weights = epoch_state(cut, epoch), epoch_weights(cut, epoch)
        if damage == "truncated state":
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        elif damage == "pickled state":
            torch.save({"spec": PurePosixPath("x")}, state)  # a global weights_only=True refuses
        else:
            weights.write_bytes(weights.read_bytes()[:100])

    spoil(2)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        distill(config(cut, resume=True))
    assert "the checkpoint of epoch 2 in" in caplog.text and "continuing from the checkpoint of epoch 1" in caplog.text
    assert (cut / STUDENT_WEIGHTS).read_bytes() == (tmp_path / "whole" / STUDENT_WEIGHTS).read_bytes()
    for epoch in (2, 3):  # the resumed run's own checkpoints, then both spoiled
        spoil(epoch)
    student = ["--student", "resnet8", "--model-kwargs", "{base_width: 8}", "--batch-size", 100, "--epochs", 4]
    result = run_cli("distill", scored_store, *student, "--out", cut, "--resume", "--device", "cpu", expect_ok=False)
    assert_one_line_error(result, "--resume: no checkpoint in", "epoch 3 (", "epoch 2 (")
