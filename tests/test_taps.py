"""Generalized layers, layouts and roles read from the models, and the default pairs of docs/method.md §2 for the
paper's four teacher -> student pairs."""

from __future__ import annotations

import pytest
import torch

from pipeline.distillation.pairing import default_student_taps
from pipeline.errors import UserError
from pipeline.models.taps import FLATTEN, STEM, Tap, TapRecorder, infer_layout, list_taps, pool_embedding, stage_ends
from pipeline.models.zoo import create_model

VIT_B = (
    "timm:vit_base_patch16_224",
    {"patch_size": 4},
)  # ViT-B/16 with the paper's 4-px patches at 32 px


def taps_of(name: str, kwargs: dict | None = None, size: int = 32) -> list[Tap]:
    return list_taps(create_model(name, 10, input_size=size, model_kwargs=kwargs), size)


def indices(taps: list[Tap]) -> list[int]:
    return [t.index for t in taps]


@pytest.mark.parametrize(
    "teacher,kwargs,layers,stem,flatten,standard",
    [
        ("resnet34_cifar", None, 18, "stem", "pool", [3, 7, 13, 16]),  # 0 stem, 1-16 blocks, 17 flatten
        # 0-15 conv ReLUs, 16 flatten, 17-18 MLP ReLUs; then 0 patch embedding + class token, 1-12 blocks
        pytest.param("tv:vgg19_bn", None, 19, None, "avgpool", [3, 7, 11, 15], marks=pytest.mark.slow),
        pytest.param(*VIT_B, 13, "embed", None, [2, 4, 8, 10], marks=pytest.mark.slow),
    ],
)
def test_paper_teachers_layers_and_stage_ends(teacher, kwargs, layers, stem, flatten, standard):
    """docs/method.md §2's layer numbering of each teacher and its stage-end ("standard") layers."""
    taps = taps_of(teacher, kwargs)
    assert len(taps) == layers
    assert [t.name for t in taps if t.role == STEM] == ([stem] if stem else [])
    assert [t.name for t in taps if t.role == FLATTEN] == ([flatten] if flatten else [])
    assert indices(stage_ends(taps)[-4:]) == standard


@pytest.mark.parametrize(
    "student,expected",
    [
        ("resnet9", [1, 2, 3, 4]),
        ("tv:mobilenet_v2", [3, 6, 13, 17]),
        pytest.param("tv:vgg11_bn", [1, 3, 5, 7], marks=pytest.mark.slow),
        ("vit_et", [1, 3, 5, 7]),
    ],
)
def test_paper_students_default_layers(student, expected):
    assert indices(default_student_taps(taps_of(student), 4)) == expected


def test_vit_et_leaves_its_last_block_to_the_head():
    names = [t.name for t in default_student_taps(taps_of("vit_et"), 4)]
    assert names == ["blocks.0", "blocks.2", "blocks.4", "blocks.6"]


def test_vit_layer0_is_the_patch_embedding_with_its_prefix_before_positions():
    """`embed` = [class token, patches] before the positional embedding, for timm ViTs and DeiT's two tokens."""
    for name, prefix in (("timm:vit_tiny_patch16_224", 1), ("timm:deit_tiny_distilled_patch16_224", 2)):
        model = create_model(name, 10, input_size=32, model_kwargs={"patch_size": 4}).eval()
        embed = next(t for t in list_taps(model, 32) if t.name == "embed")
        assert (embed.prefix_tokens, embed.grid, embed.shape) == (prefix, (8, 8), (prefix + 64, 192))
        x = torch.randn(2, 3, 32, 32)
        with TapRecorder(model, ["embed", "patch_embed"]) as rec:
            out = rec.run(x)
        assert torch.equal(out["embed"][:, prefix:], out["patch_embed"])
        assert torch.equal(out["embed"][:, 0], model.cls_token[0, 0].expand(2, -1))


def test_stages_come_from_the_model_not_from_list_position():
    """ConvNeXt lists a stem it declares nowhere in feature_info and four stages of blocks: all four stage ends
    pair by default, and every block is a generalized layer."""
    taps = taps_of("timm:convnext_atto")
    assert taps[0].name == "stem" and taps[0].role == STEM
    assert [t.name for t in default_student_taps(taps, 4)] == [
        "stages.0.blocks.1",
        "stages.1.blocks.1",
        "stages.2.blocks.5",
        "stages.3.blocks.1",
    ]
    assert sum(t.name.startswith("stages.") for t in taps) == 12  # depths (2, 2, 6, 2)


def test_blocks_inside_groups_of_blocks_are_layers():
    """EfficientNet-B0: 16 blocks in 7 groups, the stem activation, the head conv's activation and the flatten."""
    taps = taps_of("timm:efficientnet_b0")
    assert len(taps) == 19 and taps[0].name == "bn1" and [t.name for t in taps[-2:]] == ["bn2", "global_pool"]
    assert all(t.name.count(".") == 2 for t in taps[1:-2])


def test_channels_last_model_taps_are_recorded_nhwc():
    taps = taps_of("timm:swin_tiny_patch4_window7_224", {"patch_size": 2, "window_size": 4, "embed_dim": 24})
    maps = [t for t in taps if t.kind == "map"]
    assert maps and all(t.layout == "NHWC" for t in maps)
    assert taps[0].name == "patch_embed" and taps[0].spatial == (16, 16)


def test_probe_pooling_follows_the_layout():
    x = torch.randn(2, 4, 4, 6)  # NHWC: 6 channels
    assert torch.equal(pool_embedding(x, "NHWC"), x.mean(dim=(1, 2)))
    assert torch.equal(pool_embedding(x.permute(0, 3, 1, 2), "NCHW"), x.mean(dim=(1, 2)))
    tokens = torch.randn(2, 65, 8)
    assert torch.equal(pool_embedding(tokens, "NLC"), tokens.mean(1))  # the class token included, docs/method.md §4


def test_ambiguous_maps_follow_the_models_other_maps():
    """A channels-last model that says nothing: its (8, 8, 8) map is NHWC because its other maps are."""

    class ChannelsLast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 16))

        def forward(self, x):
            x = torch.nn.functional.avg_pool2d(x, 4).permute(0, 2, 3, 1)  # (B, 8, 8, 3)
            return self.blocks(x).mean(dim=(1, 2))

    taps = list_taps(ChannelsLast(), 32, names=["blocks.0", "blocks.1"])
    assert [(t.shape, t.layout) for t in taps] == [((8, 8, 8), "NHWC"), ((8, 8, 16), "NHWC")]


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((64, 8, 8), ("NCHW", 0, None)),
        ((8, 8, 96), ("NHWC", 0, None)),
        ((65, 192), ("NLC", 1, (8, 8))),
        ((66, 192), ("NLC", 2, (8, 8))),
        ((64, 192), ("NLC", 0, (8, 8))),
        ((512,), ("NC", 0, None)),
    ],
)
def test_layout_from_shape(shape, expected):
    assert infer_layout(shape) == expected


def test_a_tap_that_folds_the_batch_is_refused():
    """MobileViT's inner transformer runs on (batch x patch position) rows: not a per-sample feature."""
    model = create_model("timm:mobilevit_xxs", 10)
    assert not any("transformer" in t.name for t in list_taps(model, 32))
    with pytest.raises(UserError, match="stages.3.1.transformer.0.*folds the batch"):
        list_taps(model, 32, names=["stages.3.1.transformer.0"])


def test_pairs_far_apart_in_size_are_warned_about(caplog):
    from pipeline.distillation.pairing import _warn_if_far_apart

    with caplog.at_level("WARNING"):
        _warn_if_far_apart(Tap(1, "s", (64, 16, 16)), Tap(2, "t", (64, 4, 4)))  # 4x: pooled without a word
        assert not caplog.records
        _warn_if_far_apart(Tap(1, "s", (64, 64, 64)), Tap(2, "t", (65, 192)))  # 64 vs the 8x8 patch grid
    assert "differ 8x" in caplog.text and "(8, 8)" in caplog.text


@pytest.mark.parametrize(
    "name,kwargs,size,stage_ends",
    [
        # feature_info names single blocks here, not stages: they are layers, not opened into their convs
        ("timm:rexnet_100", {}, 32, ["features.0", "features.2", "features.4", "features.10", "features.15"]),
        ("timm:inception_v3", {}, 96, ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"]),
        # feature_info entries inside blocks (blocks.N.stack.act3) end the stage of the block holding them
        ("timm:xception41", {}, 64, ["blocks.0", "blocks.1", "blocks.2", "blocks.11", "blocks.12"]),
    ],
)
def test_feature_info_entries_that_are_blocks_stay_whole(name, kwargs, size, stage_ends):
    taps = taps_of(name, kwargs, size)
    assert [t.name for t in taps if t.role == "stage end"] == stage_ends
    assert all(t.name.count(".") <= 1 for t in taps)  # no branch or conv of a block is a layer


def test_a_stem_container_is_the_stem_not_layers():
    """timm's `stem` Sequential of conv units (LeViT) is one stem tap, never split into layers."""
    taps = taps_of("timm:levit_128s", {}, 224)
    assert taps[0].name == "stem" and taps[0].role == STEM
    assert not any(t.name.startswith("stem.") for t in taps)


def test_a_model_whose_blocks_return_tuples_is_refused():
    class Pairs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([TupleBlock(), TupleBlock()])

        def forward(self, x):
            for block in self.blocks:
                x, _ = block(x)
            return x.mean(dim=(2, 3))

    class TupleBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x), x

    with pytest.raises(UserError, match="no layer of this model outputs a per-sample tensor"):
        list_taps(Pairs(), 8)


def test_a_deep_copy_of_a_vit_feeds_its_own_layer0():
    import copy

    model = copy.deepcopy(create_model("vit_tiny_cifar", 10)).eval()
    with torch.no_grad():
        model.cls_token.fill_(3.0)
        with TapRecorder(model, ["embed"]) as rec:
            tokens = rec.run(torch.randn(1, 3, 32, 32))["embed"]
    assert torch.equal(tokens[0, 0], torch.full((96,), 3.0))


def test_built_in_resnets_start_as_the_reference_does():
    """docs/method.md §5: Kaiming-normal convolutions (fan-out, ReLU), every block's last BatchNorm weight zero."""
    torch.manual_seed(0)
    model = create_model("resnet34_cifar", 10)
    for block in (m for m in model.modules() if m.__class__.__name__ == "BasicBlock"):
        assert torch.count_nonzero(block.bn2.weight) == 0 and torch.all(block.bn1.weight == 1)
    conv = model.layer3[1].conv1  # 256 -> 256, 3x3: fan-out 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
