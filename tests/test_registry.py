"""Registries list what is registered; every built-in model honours the tap contract."""

from __future__ import annotations

import pytest
import torch

from helpers import run_cli
from pipeline.data.datasets import list_datasets
from pipeline.errors import UserError
from pipeline.models.taps import LAYER, STAGE_END, TapRecorder, candidate_taps, dry_forward, list_taps
from pipeline.models.zoo import create_model, list_models
from pipeline.registry import Registry, UnknownName


def test_model_and_dataset_listing():
    assert {"resnet8", "resnet20", "resnet32", "resnet9", "vit_et", "vit_tiny_cifar"} <= set(list_models())
    assert list_models("vit*") == ["vit_et", "vit_tiny_cifar"]
    assert set(list_datasets()) == {
        "digits",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "imagefolder",
        "synthetic",
    }
    out = run_cli("models", "resnet*").output.split()
    assert "resnet20" in out and "vit_et" not in out
    listed = run_cli("datasets").output.splitlines()
    assert "imagefolder" in listed[-3] and len({line.index("splits:") for line in listed}) == 1  # one column


def test_models_lists_each_namespace():
    """A timm: or tv: pattern lists that library's models, prefixed; a plain pattern the built-ins and a hint."""
    import timm
    import torchvision

    assert list_models("timm:convnext_a*") == [f"timm:{n}" for n in timm.list_models("convnext_a*")]
    assert "timm:convnext_atto" in list_models("timm:convnext_a*")
    tv = list_models("tv:resnet*")
    assert {"tv:resnet18", "tv:resnet50"} <= set(tv) and all(n.startswith("tv:resnet") for n in tv)
    assert "fcn_resnet50" in torchvision.models.list_models() and "tv:fcn_resnet50" not in list_models("tv:*")
    timm_listed = run_cli("models", "timm:convnext_a*")
    assert timm_listed.stdout.split() == list_models("timm:convnext_a*") and not timm_listed.stderr
    built_in = run_cli("models", "resnet2*")
    assert built_in.stdout.split() == ["resnet20"]
    assert "kdpipe models 'timm:PATTERN'" in built_in.stderr and "'tv:PATTERN'" in built_in.stderr
    assert run_cli("models", "tv:nothing_like_this*").stdout == ""


def test_registry_rejects_duplicates_and_names_unknown():
    reg = Registry("widget")

    @reg.register
    def gear():
        return 1

    with pytest.raises(ValueError):
        reg.register(gear)
    with pytest.raises(UnknownName, match="unknown widget 'cog'; known: gear"):
        reg.get("cog")


def test_an_unknown_name_is_told_the_closest_names():
    """difflib's closest registered names (every one of a tie), none when nothing is close; the summary a listing
    shows is the docstring's whole first paragraph."""
    reg = Registry("model")
    for name in ("resnet20", "resnet32", "vit_et"):
        reg.register(lambda: None, name=name)
    with pytest.raises(UnknownName, match=r"'resnet200'; did you mean 'resnet20'\? known: resnet20, resnet32, vit"):
        reg.get("resnet200")
    with pytest.raises(UnknownName, match=r"'resnet21'; did you mean 'resnet20' or 'resnet32'\? known"):
        reg.get("resnet21")
    with pytest.raises(UnknownName, match=r"^unknown model 'convnext'; known: "):
        reg.get("convnext")

    @reg.register
    def described():
        """First line,
        continued.

        Details."""

    assert reg.summary("described") == "First line, continued."


@pytest.mark.parametrize("name", list_models())
def test_taps_match_forward(name):
    """Shapes from `list_taps` match a real forward; recording taps leaves the logits unchanged."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, input_size=32).eval()
    taps = list_taps(model, 32)
    assert [t.index for t in taps] == list(range(len(taps)))
    assert sorted(t.name for t in taps if t.role in (LAYER, STAGE_END)) == sorted(candidate_taps(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with TapRecorder(model, [t.name for t in taps]) as rec:
            feats = rec.run(x)
    assert torch.equal(rec.logits, plain) and plain.shape == (2, 7)
    for tap in taps:
        assert tuple(feats[tap.name].shape) == (2, *tap.shape)


def test_input_size_reaches_timm_models_that_take_an_image_size():
    vit = create_model("timm:vit_tiny_patch16_224", 10, input_size=32, model_kwargs={"patch_size": 4})
    assert vit.patch_embed.grid_size == (8, 8)
    assert list_taps(vit, 32, names=["blocks.11"], num_classes=10)[0].shape == (65, 192)  # 8x8 patches + class
    swin = create_model(
        "timm:swin_tiny_patch4_window7_224", 10, input_size=32, model_kwargs={"patch_size": 2, "window_size": 4}
    )
    assert swin.patch_embed.img_size == (32, 32)
    assert dry_forward(swin, 32, num_classes=10).logits.shape == (2, 10)
    assert "(5, 192)" in run_cli("layers", "timm:vit_tiny_patch16_224").output  # 2x2 patches of 16 at 32 px
    # The user's img_size wins; models without one build as before; other refusals are not taken for that one.
    fixed = create_model("timm:vit_tiny_patch16_224", 10, input_size=32, model_kwargs={"img_size": 64})
    assert fixed.patch_embed.img_size == (64, 64)
    assert create_model("timm:resnet18", 10, input_size=32)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="unexpected keyword argument 'depth_of_field'"):
        create_model("timm:resnet18", 10, input_size=32, model_kwargs={"depth_of_field": 3})


def test_dry_forward_leaves_mode_and_random_state_as_they_were():
    class Noisy(torch.nn.Module):  # draws random numbers in every forward pass, even in eval mode
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3)) + torch.randn(len(x), 3))

    model = Noisy().train()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert dry_forward(model, 8, num_classes=4).logits.shape == (2, 4)
    assert torch.equal(torch.rand(3), expected) and model.training
    with pytest.raises(UserError, match=r"has shape \(2, 4\), not \(2, 5\)"):
        dry_forward(model, 8, num_classes=5)


def test_early_stop_does_not_run_past_last_tap():
    model = create_model("resnet8", 10).eval()
    calls = []
    model.fc.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), TapRecorder(model, ["layer2.0"], stop_after_last=True) as rec:
        rec.run(torch.zeros(1, 3, 32, 32))
    assert rec.logits is None and calls == []


@pytest.mark.parametrize(
    "name,first,count",
    [
        ("timm:resnet18", "act1", 10),  # stem activation, 8 blocks, global pool
        ("tv:mobilenet_v2", "features.0", 19),  # stem, 17 inverted-residual blocks, the final 1x1 conv
        pytest.param(
            "tv:vgg11_bn", "features.2", 11, marks=pytest.mark.slow
        ),  # 8 conv ReLUs, avgpool, 2 classifier ReLUs
    ],
)
def test_tap_discovery_for_external_models(name, first, count):
    taps = list_taps(create_model(name, 10), 64)
    assert taps[0].name == first and len(taps) == count


def test_layers_command_prints_taps_in_depth_order():
    lines = run_cli("layers", "resnet8").output.strip().splitlines()[1:]
    assert [line.split()[1] for line in lines] == ["stem", "layer1.0", "layer2.0", "layer3.0", "pool"]
    assert "(64, 8, 8)" in lines[3]
    vit = run_cli("layers", "vit_et").output
    assert "blocks.7" in vit and "(65, 192)" in vit


def test_layers_bytes_are_float16_bytes_per_image():
    """resnet8 at 32 px: stem and layer1.0 (16, 32, 32), layer2.0 (32, 16, 16), layer3.0 (64, 8, 8), pool (64,)."""
    lines = run_cli("layers", "resnet8", "--bytes").output.strip().splitlines()
    assert lines[0].split()[-2:] == ["KiB/image", "shape"]
    per_tap = {line.split()[1]: float(line.split(" (")[0].split()[-1]) for line in lines[1:-1]}
    expected = {"stem": 16 * 32 * 32 * 2, "layer1.0": 16 * 32 * 32 * 2, "layer2.0": 32 * 16 * 16 * 2}
    expected |= {"layer3.0": 64 * 8 * 8 * 2, "pool": 64 * 2}
    assert per_tap == {name: round(b / 1024, 1) for name, b in expected.items()}
    assert lines[-1] == f"all 5 taps: {sum(expected.values()) / 1024:.1f} KiB per image, before compression"


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped"])
def test_checkpoint_formats_load_exactly(tmp_path, fmt):
    from pipeline.engine.checkpoints import load_checkpoint, read_model_spec, save_checkpoint
    from pipeline.models.spec import ModelSpec

    torch.manual_seed(1)
    source = create_model("resnet8", 10)
    path = tmp_path / f"w.{fmt.split('-')[0]}"
    if fmt == "safetensors":
        save_checkpoint(source, path, ModelSpec("resnet8", 10))
        assert read_model_spec(path) == ModelSpec("resnet8", 10)
    else:
        state = source.state_dict()
        torch.save({"state_dict": state, "epoch": 3} if fmt == "pt-wrapped" else state, path)
    target = create_model("resnet8", 10)
    load_checkpoint(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_vit_layer_zero_is_patch_tokens_with_class_token():
    model = create_model("vit_tiny_cifar", 10).eval()
    with torch.no_grad(), TapRecorder(model, ["embed"]) as rec:
        tokens = rec.run(torch.randn(2, 3, 32, 32))["embed"]
        patches = model.patch_embed(torch.randn(1, 3, 32, 32))
    assert tokens.shape == (2, 65, 96) and patches.shape == (1, 64, 96)
    assert torch.equal(tokens[:, 0], model.cls_token[0].expand(2, -1))  # class token first, no position added
