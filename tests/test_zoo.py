"""The model zoo: tiny random-init timm and torchvision models of every layout family at 32 px, each through
`kdpipe layers`, an extract round trip (cached features equal a live forward, layouts as the model has them), one
distill step against its own stage ends, and a probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache.store import FeatureStore
from helpers import run_cli
from pipeline.models import create_model
from pipeline.provenance import load_matching_split
from pipeline.taps import TapRecorder, list_taps

# One small configuration per family; every layout kdpipe knows occurs: NCHW maps, NHWC maps (Swin, MambaOut),
# tokens with one prefix token (ViT) and two (DeiT), vectors (global pools).
ZOO = {
    "timm:test_resnet": {},
    "timm:test_convnext": {},
    "timm:test_efficientnet": {},
    "timm:mobilenetv3_small_050": {},
    "timm:regnetx_002": {},
    "timm:test_vit": {"patch_size": 4},
    "timm:deit_tiny_distilled_patch16_224": {"patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 2},
    "timm:swin_tiny_patch4_window7_224": {
        "patch_size": 2,
        "window_size": 4,
        "embed_dim": 24,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 2, 4],
    },
    "timm:test_mambaout": {},
    "timm:mobilevit_xxs": {},
    "tv:resnet18": {},
    "tv:mobilenet_v2": {"width_mult": 0.25},
}


@pytest.mark.slow  # 12 families in about 10 s: CI's full suite runs them, make test-fast keeps under a minute
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_through_every_stage(name, tmp_path):
    kwargs = ZOO[name]
    flags = ["--model-kwargs", json.dumps(kwargs)]
    listing = run_cli("layers", name, *flags).output
    assert "stage end" in listing and "stem" in listing

    torch.manual_seed(0)
    teacher = create_model(name, 10, input_size=32, model_kwargs=kwargs).eval()
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.pth")
    extract = ["extract", "--teacher", name, *flags, "--checkpoint", tmp_path / "teacher.pth", "--max-samples", 120]
    run_cli(*extract, "--batch-size", 64, "--out", tmp_path / "x", "--device", "cpu")

    store = FeatureStore.open(tmp_path / "x")
    recorded = store.meta["identity"]["taps"]
    assert recorded == [t.record() for t in list_taps(teacher, 32)]  # shapes, layouts and roles as the model has them
    part = store.split("train")
    data = load_matching_split(store, "train", None, None)
    rows = part.array("indices")[:8]
    images = torch.stack([data[int(i)][0] for i in rows])
    with torch.no_grad(), TapRecorder(teacher, [t["name"] for t in recorded]) as recorder:
        live = recorder.run(images)
    for tap in recorded:
        cached = part.feature(tap["name"])[:8].astype(np.float32)
        expected = live[tap["name"]].numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(cached, expected, rtol=1e-3, atol=1e-3, err_msg=tap["name"])

    distill = ["distill", tmp_path / "x", "--student", name, *flags, "--method", "feature-standard"]
    run_cli(*distill, "--steps", 1, "--batch-size", 32, "--out", tmp_path / "run", "--device", "cpu")
    summary = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert [p["teacher"] for p in summary["pairs"]] == store.meta["identity"]["teacher"]["stage_ends"][-4:]
    run_cli("probe", tmp_path / "run", "--max-iter", 5, "--device", "cpu")
    probe = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert probe["tap"] == summary["pairs"][-1]["student"] and 0.0 <= probe["test_top1"] <= 100.0
