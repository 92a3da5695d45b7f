"""The bad-input suite: every kind of user mistake, across all commands, is one `Error:` line naming the problem,
a non-zero exit, no traceback, and no output left looking complete."""

from __future__ import annotations

import pytest
import torch

from cache.store import FeatureStore
from helpers import assert_one_line_error, make_store, run_cli
from pipeline import layout
from pipeline.engine.checkpoints import save_checkpoint
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import create_model

SUMMARIES = (
    layout.TEACH_SUMMARY,
    layout.EXTRACT_SUMMARY,
    layout.SCORES,
    layout.DISTILL_SUMMARY,
    layout.PROBE_SUMMARY,
    layout.TEACHER_WEIGHTS,
    layout.STUDENT_WEIGHTS,
    layout.CLASSIFIER,
)


@pytest.fixture(scope="module")
def places(digits_teacher, tmp_path_factory):
    """A scored store, a newer-format store, a one-class store, an empty image folder and a distilled run."""
    root = tmp_path_factory.mktemp("bad")
    run_cli(
        "extract",
        "--teacher",
        "resnet20",
        "--checkpoint",
        digits_teacher["checkpoint"],
        "--layers",
        "layer2.2,layer3.2",
        "--max-samples",
        300,
        "--device",
        "cpu",
        "--out",
        root / "store",
    )
    run_cli("score", root / "store", "--top-k", 2, "--no-plot")
    newer = FeatureStore.open(
        make_store(root / "newer" / "features.zarr", {"x": torch.ones(4, 2).numpy()}, [0, 0, 1, 1]).path, mode="r+"
    )
    newer.update_meta(format_version=99)
    make_store(root / "oneclass" / "features.zarr", {"x": torch.randn(6, 2).numpy()}, [0] * 6)
    (root / "images" / "train" / "cat").mkdir(parents=True)
    (root / "images" / "val" / "cat").mkdir(parents=True)
    features_only = ModelSpec("timm:test_resnet", 10, model_kwargs={"features_only": True})
    net = create_model(features_only.model, 10, model_kwargs=features_only.model_kwargs)
    save_checkpoint(net, root / "features_only.safetensors", features_only)
    return {"root": root, "ckpt": digits_teacher["checkpoint"]}


CASES = {
    "unknown model": (["layers", "resnet99"], "unknown model 'resnet99'"),
    "unknown timm model": (["layers", "timm:nope_net"], "cannot create model"),
    "unknown dataset": (["teach", "--dataset", "svhn", "--out", "{out}"], "unknown dataset 'svhn'"),
    "unknown tap": (["extract", "--checkpoint", "{ckpt}", "--layers", "layer7.7", "--out", "{out}"], "unknown tap"),
    "unknown method": (["distill", "{store}", "--method", "magic", "--out", "{out}"], "unknown method 'magic'"),
    "unknown student tap": (["distill", "{store}", "--student-layers", "nope,nada", "--out", "{out}"], "unknown tap"),
    "wrong type": (["teach", "--epochs", "many", "--out", "{out}"], "'many'"),
    "out of range": (["teach", "--batch-size", "0", "--out", "{out}"], "--batch-size"),
    "top-k out of range": (["score", "{store}", "--top-k", "0"], "--top-k"),
    "bad device": (
        ["teach", "--device", "cuda", "--out", "{out}"]
        if not torch.cuda.is_available()
        else ["teach", "--device", "tpu", "--out", "{out}"],
        "--device",
    ),
    "score on absent CUDA": (
        ["score", "{store}", "--device", "cuda"]
        if not torch.cuda.is_available()
        else ["score", "{store}", "--device", "tpu"],
        "--device",
    ),
    "missing checkpoint": (
        ["extract", "--checkpoint", "{root}/none.safetensors", "--out", "{out}"],
        "checkpoint not found",
    ),
    "no teacher weights": (["extract", "--out", "{out}"], "needs weights"),
    "checkpoint key without checkpoint": (
        ["extract", "--pretrained", "--checkpoint-key", "state_dict", "--out", "{out}"],
        "--checkpoint-key state_dict: there is no --checkpoint",
    ),
    "missing data root": (
        ["teach", "--dataset", "cifar100", "--data-root", "{root}/nowhere", "--out", "{out}"],
        "data root not found",
    ),
    "empty dataset": (
        ["teach", "--dataset", "imagefolder", "--data-root", "{root}/images", "--out", "{out}"],
        "holds no images",
    ),
    "one-class dataset": (["score", "{root}/oneclass"], "at least 2 classes"),
    "ViT image size": (["layers", "vit_et", "--input-size", "36"], "multiple of 8"),
    "ViT size mismatch": (
        ["layers", "vit_et", "--input-size", "64", "--model-kwargs", "{{img_size: 32}}"],
        "does not accept 64x64",
    ),
    "newer store format": (["info", "{root}/newer"], "newer than this kdpipe reads"),
    "not a store": (["verify", "{root}/images"], "no feature store"),
    "missing store": (["score", "{root}/nowhere"], "no feature store"),
    "unscored store taps mismatch": (
        [
            "distill",
            "{store}",
            "--teacher-layers",
            "layer3.2",
            "--student-layers",
            "layer1.0,layer2.0",
            "--out",
            "{out}",
        ],
        "--student-layers names 2 taps for 1 teacher taps",
    ),
    "resume without checkpoint": (["distill", "{store}", "--resume", "--out", "{out}"], "holds no checkpoint"),
    "probe without run": (["probe", "{root}/images"], "holds no distilled student"),
    "bad model kwargs": (["layers", "resnet8", "--model-kwargs", "{{depth_of_field: 3}}"], "cannot create model"),
    "bad compression": (
        ["extract", "--checkpoint", "{ckpt}", "--compression", "zip", "--out", "{out}"],
        "compression 'zip'",
    ),
    "unknown config key": (["teach", "--config", "{root}/bad.yaml", "--out", "{out}"], "unknown key 'epoch'"),
    # teach checks its model on one small batch before training, with the check extract's taps go through
    "teacher ViT size": (
        ["teach", "--teacher", "timm:vit_tiny_patch16_224", "--model-kwargs", "{{img_size: 224}}", "--out", "{out}"],
        "does not accept 32x32 inputs",
    ),
    "teacher returns a list": (
        ["teach", "--teacher", "timm:resnet18", "--model-kwargs", "{{features_only: true}}", "--out", "{out}"],
        "output (list) is not a logits tensor of shape (batch, 10)",
    ),
    "teacher returns a dict": (
        [
            "teach",
            "--teacher",
            "timm:resnet18",
            "--model-kwargs",
            "{{features_only: true, feature_cls: dict}}",
            "--out",
            "{out}",
        ],
        "output (OrderedDict) is not a logits tensor",
    ),
    "teacher logits shape": (
        ["teach", "--teacher", "timm:vit_tiny_patch16_224", "--model-kwargs", "{{global_pool: ''}}", "--out", "{out}"],
        "has shape (2, 5, 10), not (2, 10)",
    ),
    "teacher kwargs": (
        ["teach", "--teacher", "timm:resnet18", "--model-kwargs", "{{depth_of_field: 3}}", "--out", "{out}"],
        "cannot create model 'timm:resnet18'",
    ),
    "picks without a path": (["extract", "--checkpoint", "{ckpt}", "--layers", "picked:", "--out", "{out}"], "no path"),
    "picks of an unscored store": (
        ["extract", "--checkpoint", "{ckpt}", "--layers", "picked:{root}/oneclass", "--out", "{out}"],
        "was never scored",
    ),
    "picks from a broken scores file": (
        ["extract", "--checkpoint", "{ckpt}", "--layers", "picked:{root}/picks.json", "--out", "{out}"],
        "picks.json is not a readable kdpipe scores file (no 'selected' entry)",
    ),
    "extracted teacher returns a list": (
        [
            "extract",
            "--teacher",
            "timm:test_resnet",
            "--checkpoint",
            "{root}/features_only.safetensors",
            "--out",
            "{out}",
        ],
        "output (list) is not a logits tensor",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, places, tmp_path):
    args, fragment = CASES[case]
    (places["root"] / "bad.yaml").write_text("epoch: 3\n")
    (places["root"] / "picks.json").write_text('{"taps": []}')
    fill = {"root": places["root"], "store": places["root"] / "store", "ckpt": places["ckpt"], "out": tmp_path / "out"}
    result = (
        run_cli(*[a.format(**fill) for a in args], "--device", "cpu", expect_ok=False)
        if args[0] in ("teach", "extract", "distill") and "--device" not in args
        else run_cli(*[a.format(**fill) for a in args], expect_ok=False)
    )
    assert_one_line_error(result, fragment)
    left = [p.name for p in (tmp_path / "out").rglob("*") if p.name in SUMMARIES] if (tmp_path / "out").exists() else []
    assert not left, f"{case} left {left} behind"
    if case.startswith("teacher"):  # refused before training started
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["teach", "--out", "s3://bucket/teacher", "--epochs", "1"],
        ["report", "--store", "missing-store", "--out", "s3://bucket/report"],
        ["q-test", "--store", "missing-store", "--out", "gs://bucket/q-test"],
    ],
    ids=["teach", "report", "q-test"],
)
def test_commands_that_write_locally_refuse_a_url_instead_of_making_a_scheme_folder(command, tmp_path, monkeypatch):
    """`teach --out s3://bucket/t` once wrote a local folder named `s3:`: a command that writes to local folders only
    refuses object storage in one line, before any other check, and creates nothing."""
    monkeypatch.chdir(tmp_path)
    result = run_cli(*command, expect_ok=False)
    assert_one_line_error(result, command[command.index("--out") + 1], "writes to a local folder only")
    assert list(tmp_path.iterdir()) == []
