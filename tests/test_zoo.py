"""The model zoo: tiny random-init timm and torchvision models of every layout family at 32 px, each through
`kdpipe layers`, an extract round trip (cached features equal a live forward, layouts as the model has them), one
distill step against its own stage ends, and a probe; and the corners of tap discovery, one family of each kind
(blocks that are bare Sequentials, the final conv before the global pool, downsamplers between stages, the input size
a model is built for), checked by contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cache.store import FeatureStore
from helpers import run_cli
from pipeline.engine.provenance import load_matching_split
from pipeline.errors import UserError
from pipeline.models.taps import FLATTEN, LAYER, STAGE_END, Tap, TapRecorder, list_taps, stage_ends
from pipeline.models.zoo import create_model

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
    assert probe["tap"] == summary["pairs"][-1]["student"]
    correct = probe["test_top1"] * probe["num_test"] / 100  # a count of the test images, not float32 noise
    assert correct == pytest.approx(round(correct), abs=1e-9)
    assert probe["num_test"] > 0


def taps_matching_a_forward(model: nn.Module, size: int = 32) -> list[Tap]:
    """The model's taps, checked against a real forward: shapes as recorded, indices in depth order, logits as
    without taps."""
    model.eval()
    taps = list_taps(model, size)
    assert [t.index for t in taps] == list(range(len(taps)))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = model(x)
        with TapRecorder(model, [t.name for t in taps]) as recorder:
            live = recorder.run(x)
    assert torch.equal(recorder.logits, plain)
    assert {name: tuple(out.shape[1:]) for name, out in live.items()} == {t.name: t.shape for t in taps}
    return taps


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class TokenMixer(nn.Module):
    """An isotropic token model whose blocks are bare Sequentials, `Sequential(Residual(MLP), LayerNorm)`: ConvMixer's
    kind of block on tokens (NLC) instead of maps."""

    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 8, 8), Tokens())
        mlp = [(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(depth)]
        self.blocks = nn.Sequential(*[nn.Sequential(Residual(nn.Sequential(*m)), nn.LayerNorm(dim)) for m in mlp])
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(1))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: create_model("timm:convmixer_768_32", 10, input_size=32), id="timm:convmixer_768_32"),
        pytest.param(TokenMixer, id="token-mixer"),
    ],
)
def test_a_bare_sequential_block_is_one_layer(build):
    """Each block's output is a tap, not a module inside it, though the block is a plain nn.Sequential."""
    torch.manual_seed(0)
    model = build()
    taps = taps_matching_a_forward(model)
    assert [t.name for t in taps if t.role in (LAYER, STAGE_END)] == [f"blocks.{i}" for i in range(len(model.blocks))]
    assert taps[0].name == "stem"


def corner(name: str, blocks: tuple[str, ...], head_conv: str | None = None, downsampler: str | None = None, **kwargs):
    return pytest.param(name, kwargs, blocks, head_conv, downsampler, id=name)


# One family of each kind: the model, its block classes, its final conv before the global pool and its downsampler
# class between stages. The final conv is a layer after the last block but no stage end: docs/method.md §4 counts
# MobileNetV2's 1x1 conv to 1280 in the head, and §2 gives its stage ends as 3, 6, 13, 17, the last block last.
CORNERS = [
    corner("tv:mobilenet_v2", ("InvertedResidual",), "features.18", width_mult=0.25),
    corner("tv:mobilenet_v3_small", ("InvertedResidual",), "features.12"),
    corner("tv:efficientnet_b0", ("MBConv",), "features.8"),
    corner("tv:shufflenet_v2_x0_5", ("InvertedResidual",), "conv5"),
    corner("tv:mnasnet0_5", ("_InvertedResidual",), "layers.16"),  # conv, norm and ReLU loose in a Sequential
    corner("timm:efficientnet_b0", ("DepthwiseSeparableConv", "InvertedResidual"), "bn2"),  # conv_head's activation
    corner("tv:swin_t", ("SwinTransformerBlock",), downsampler="PatchMerging"),
    corner("tv:swin_v2_t", ("SwinTransformerBlockV2",), downsampler="PatchMergingV2"),
    corner(
        "timm:swin_tiny_patch4_window7_224",
        ("SwinTransformerBlock",),
        downsampler="PatchMerging",
        **ZOO["timm:swin_tiny_patch4_window7_224"],
    ),
    corner("timm:efficientvit_m0", ("EfficientVitBlock",), downsampler="PatchMerging"),  # between residual units
    corner("tv:vit_b_16", ("EncoderBlock",)),
]


@pytest.mark.parametrize("name,kwargs,blocks,head_conv,downsampler", CORNERS)
def test_taps_keep_their_contracts(name, kwargs, blocks, head_conv, downsampler):
    """Every block is a tap, nothing inside one is, and no downsampler is; the final conv before the global pool is
    the deepest tap but the flatten, a layer right after the last block; a block is the deepest stage end; recorded
    shapes match a forward."""
    torch.manual_seed(0)
    model = create_model(name, 10, input_size=32, model_kwargs=kwargs)
    taps = taps_matching_a_forward(model)
    modules = dict(model.named_modules())
    block_names = [n for n, m in modules.items() if type(m).__name__ in blocks]
    names = [t.name for t in taps]
    assert block_names and set(block_names) <= set(names)
    assert not any(n.startswith(f"{b}.") for n in names for b in block_names)
    assert downsampler not in {type(modules[n]).__name__ for n in names}
    assert stage_ends(taps)[-1].name in block_names
    body = [t for t in taps if t.role != FLATTEN]
    assert body[-1].name == (head_conv or block_names[-1])
    if head_conv:
        assert body[-1].role == LAYER and body[-2].name == block_names[-1]


def test_torchvision_vit_is_built_for_the_served_size():
    model = create_model("tv:vit_b_16", 10, input_size=32)
    assert model.image_size == 32
    tokens = list_taps(model, 32)[-1]
    assert (tokens.shape, tokens.prefix_tokens, tokens.grid) == ((5, 768), 1, (2, 2))  # class token + 2x2 patches


@pytest.mark.parametrize(
    "build,kwarg",
    [
        (
            lambda: torchvision_vit(image_size=64, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8),
            "image_size",
        ),
        (lambda: create_model("timm:vit_tiny_patch16_224", 10, model_kwargs={"img_size": 64}), "img_size"),
    ],
    ids=["torchvision", "timm"],
)
def test_a_model_built_for_another_size_is_told_which_argument_sets_it(build, kwarg):
    with pytest.raises(UserError, match=f'does not accept 32x32 inputs: .*"{kwarg}": 32'):
        list_taps(build(), 32)


def torchvision_vit(**kwargs) -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(num_classes=10, **kwargs)
