"""Model registry: built-in CIFAR-style networks, `timm:<name>` and `tv:<name>`; `create_model` and `load_teacher`.

Built-in models carry `default_taps`, their generalized layers (stem activation, every block, the flatten) by
module path; other models get theirs discovered by `pipeline.taps`.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from timm.models.resnet import BasicBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoints import load_checkpoint, read_model_spec
from .datasets import Preprocessing
from .errors import UserError, first_line
from .registry import Registry

MODELS: Registry = Registry("model")
register_model = MODELS.register
PREFIXES = ("timm:", "tv:")


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, CIFAR variant): 3×3 stride-1 stem, no max-pool, BasicBlock stages.

    Stage i has `depths[i]` blocks of width `widths[i]`; every stage after the first halves the resolution.
    """

    def __init__(self, depths: list[int], widths: list[int], num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        in_width = widths[0]
        self.stage_names = []
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [_basic_block(in_width, width, stride)] + [_basic_block(width, width, 1) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
            in_width = width
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_width, num_classes)
        self.default_taps = (
            ["stem"] + [f"{s}.{j}" for s, d in zip(self.stage_names, depths, strict=True) for j in range(d)] + ["pool"]
        )
        self.feature_info = [  # stage ends, as timm describes its models' feature maps
            {"module": f"{s}.{d - 1}", "num_chs": w, "reduction": 2**i}
            for i, (s, d, w) in enumerate(zip(self.stage_names, depths, widths, strict=True))
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.forward_features(x)))


def _basic_block(in_width: int, width: int, stride: int) -> BasicBlock:
    downsample = None
    if stride != 1 or in_width != width:
        downsample = nn.Sequential(nn.Conv2d(in_width, width, 1, stride, bias=False), nn.BatchNorm2d(width))
    return BasicBlock(in_width, width, stride=stride, downsample=downsample)


def _cifar_resnet(depths: list[int], base_width: int, num_classes: int, in_chans: int) -> CifarResNet:
    widths = [base_width * 2**i for i in range(len(depths))]
    return CifarResNet(depths, widths, num_classes=num_classes, in_chans=in_chans)


@register_model
def resnet8(num_classes: int = 10, in_chans: int = 3, base_width: int = 16) -> nn.Module:
    return _cifar_resnet([1, 1, 1], base_width, num_classes, in_chans)


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 3, base_width: int = 16) -> nn.Module:
    return _cifar_resnet([3, 3, 3], base_width, num_classes, in_chans)


@register_model
def resnet32(num_classes: int = 10, in_chans: int = 3, base_width: int = 16) -> nn.Module:
    return _cifar_resnet([5, 5, 5], base_width, num_classes, in_chans)


@register_model
def resnet56(num_classes: int = 10, in_chans: int = 3, base_width: int = 16) -> nn.Module:
    return _cifar_resnet([9, 9, 9], base_width, num_classes, in_chans)


@register_model
def resnet9(num_classes: int = 10, in_chans: int = 3, base_width: int = 64) -> nn.Module:
    """The paper's ResNet-9 student: four stages of one BasicBlock each."""
    return _cifar_resnet([1, 1, 1, 1], base_width, num_classes, in_chans)


@register_model
def resnet18_cifar(num_classes: int = 10, in_chans: int = 3, base_width: int = 64) -> nn.Module:
    return _cifar_resnet([2, 2, 2, 2], base_width, num_classes, in_chans)


@register_model
def resnet34_cifar(num_classes: int = 10, in_chans: int = 3, base_width: int = 64) -> nn.Module:
    """The paper's ResNet-34 teacher topology with the CIFAR stem."""
    return _cifar_resnet([3, 4, 6, 3], base_width, num_classes, in_chans)


class TokensWithClass(nn.Module):
    """Prepends the class token to the patch tokens: the tap METHOD.md calls ViT layer 0 (before positions)."""

    def forward(self, patches: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        return torch.cat([cls_token.expand(len(patches), -1, -1), patches], dim=1)


class SmallViT(VisionTransformer):
    """timm's VisionTransformer with a tappable `embed` module (class + patch tokens, no positions yet)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.embed = TokensWithClass()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.embed(x, self.cls_token) + self.pos_embed)


def _small_vit(img_size: int, depth: int, dim: int, heads: int, mlp_ratio: float, num_classes: int, in_chans: int):
    """timm ViT sized for small images: patch = img_size / 8, so 64 patch tokens plus the class token."""
    if img_size % 8:
        raise UserError(f"ViT input size must be a multiple of 8, got {img_size}")
    model = SmallViT(
        img_size=img_size,
        patch_size=img_size // 8,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        global_pool="avg",
    )
    model.default_taps = ["embed"] + [f"blocks.{i}" for i in range(depth)]
    return model


@register_model
def vit_et(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """The paper's ViT-ET student: 8 blocks, dim 192, 6 heads, MLP 576."""
    return _small_vit(img_size, 8, 192, 6, 3.0, num_classes, in_chans)


@register_model
def vit_tiny_cifar(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """A 6-block, dim-96 ViT small enough for CPU tests and demos."""
    return _small_vit(img_size, 6, 96, 3, 2.0, num_classes, in_chans)


def split_namespace(name: str) -> tuple[str, str]:
    """("timm:", "resnet18") for `timm:resnet18`, ("tv:", ...) for `tv:...`, ("", name) for a built-in name."""
    prefix = next((p for p in PREFIXES if name.startswith(p)), "")
    return prefix, name[len(prefix) :]


def list_models(pattern: str = "*") -> list[str]:
    """Built-in models matching a shell-style pattern; `timm:PATTERN` lists timm's and `tv:PATTERN` torchvision's
    classification models, prefixed as `create_model` takes them."""
    prefix, rest = split_namespace(pattern)
    if prefix == "timm:":
        import timm

        return [prefix + n for n in timm.list_models(rest)]
    if prefix == "tv:":
        import torchvision

        return [prefix + n for n in sorted(torchvision.models.list_models(torchvision.models, include=rest))]
    return MODELS.names(pattern)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    input_size: int | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Builds `name`; `timm:x` goes to `timm.create_model`, `tv:x` to `torchvision.models.get_model`.

    `input_size` reaches the models that take `img_size` (built-in and timm ViTs, timm's DeiT, Swin, ...) unless
    `model_kwargs` sets it; other models get extra arguments from `model_kwargs` only.
    """
    kwargs = dict(model_kwargs or {})
    prefix, rest = split_namespace(name)
    try:
        if prefix == "timm:":
            return _timm_model(
                rest, input_size, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
            )
        if prefix == "tv:":
            import torchvision

            weights = "DEFAULT" if pretrained else None
            return torchvision.models.get_model(rest, weights=weights, num_classes=num_classes, **kwargs)
        factory = MODELS.get(name)
        if pretrained:
            raise UserError(f"built-in model {name!r} has no pretrained weights; pass --checkpoint")
        if input_size is not None and "img_size" in inspect.signature(factory).parameters:
            kwargs.setdefault("img_size", input_size)
        return factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except UserError:
        raise
    except Exception as err:  # unknown timm/torchvision names, bad kwargs, pretrained weights not cached, ...
        raise UserError(f"cannot create model {name!r}: {first_line(err)}") from err


def _timm_model(name: str, input_size: int | None, **kwargs) -> nn.Module:
    """`timm.create_model`, with `img_size=input_size` where the model's class takes it and `kwargs` do not set it.

    timm's entrypoints pass their arguments on to the class, so a class without the parameter refuses it by name;
    that refusal, and only that, builds the model without it.
    """
    import timm

    if input_size is None or "img_size" in kwargs:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=input_size, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument 'img_size'" not in str(err):
            raise
    return timm.create_model(name, **kwargs)


def served_preprocessing(name: str, model: nn.Module, dataset: Preprocessing, normalization: str) -> Preprocessing:
    """The preprocessing model `name` is served with: the dataset's (`dataset`), or with normalization "model" for a
    timm model, its pretrained config's mean, std, interpolation and crop_pct at the dataset's input size."""
    if normalization == "dataset" or split_namespace(name)[0] != "timm:":
        return dataset
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return replace(
        dataset,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
    )


def load_teacher(
    name: str,
    checkpoint: str | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
    num_classes: int,
    input_size: int,
) -> nn.Module:
    """The teacher with its weights; a missing, unreadable or mismatched checkpoint is a UserError."""
    if not split_namespace(name)[0]:
        MODELS.get(name)  # an unknown name is reported before anything is read
    if checkpoint is None and not pretrained:
        raise UserError("the teacher needs weights: pass --checkpoint FILE (or --pretrained for timm/torchvision)")
    spec = read_model_spec(checkpoint) if checkpoint and Path(checkpoint).is_file() else None
    if spec and spec.get("model") != name:
        raise UserError(f"checkpoint {checkpoint} holds a {spec.get('model')!r}, not a {name!r}")
    if spec and spec.get("num_classes") != num_classes:
        raise UserError(f"checkpoint {checkpoint} has {spec.get('num_classes')} classes; the dataset has {num_classes}")
    if spec and not model_kwargs:
        model_kwargs = spec.get("model_kwargs") or None
    model = create_model(name, num_classes, input_size=input_size, pretrained=pretrained, model_kwargs=model_kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model
