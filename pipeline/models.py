"""Model registry: built-in CIFAR-style networks, `timm:<name>` and `tv:<name>`; `create_model` and `load_teacher`.

Every model, built-in or not, gets its generalized layers discovered by `pipeline.taps` from its module tree and
`feature_info`. Every timm VisionTransformer (the built-in ViTs are ones) gains the layer-0 tap `embed`.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from pathlib import Path
from typing import Any

import torch
from timm.models.resnet import BasicBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoints import load_checkpoint, read_model_spec
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
        _reference_init(self)
        self.feature_info = [  # the stages, as timm describes its ResNets' feature maps
            {"module": s, "num_chs": w, "reduction": 2**i}
            for i, (s, w) in enumerate(zip(self.stage_names, widths, strict=True))
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.forward_features(x)))


def _reference_init(model: nn.Module) -> None:
    """The reference's ResNet initialisation (METHOD.md §5): Kaiming-normal convolutions (fan-out, ReLU), BatchNorm
    at weight 1 and bias 0, then each block's last BatchNorm weight at zero so every block starts as the identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, BasicBlock):
            module.zero_init_last()


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


class PrefixedPatches(nn.Module):
    """ViT layer 0 (METHOD.md §3): the prefix tokens (class, then distillation or register tokens) before the patch
    tokens, positions not yet added. An observation point for taps; the model's forward is unchanged."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def add_layer0(vit: VisionTransformer) -> VisionTransformer:
    """Gives a timm ViT the tap `embed` (no parameters, so checkpoints are unchanged), fed from `patch_embed`."""
    vit.embed = PrefixedPatches()
    vit.patch_embed.register_forward_hook(functools.partial(_feed_layer0, weakref.ref(vit)))
    return vit


def _feed_layer0(owner: weakref.ref, patch_embed: nn.Module, args, patches: torch.Tensor) -> None:
    vit = owner()
    if vit is None or not vit.embed._forward_hooks:  # only a tap on `embed` needs the concatenation
        return
    prefix = [getattr(vit, t, None) for t in ("cls_token", "dist_token", "reg_token")]
    patches = patches.flatten(1, 2) if patches.dim() == 4 else patches  # dynamic_img_size gives NHWC patches
    vit.embed(torch.cat([t.expand(len(patches), -1, -1) for t in prefix if t is not None] + [patches], dim=1))


def _small_vit(img_size: int, depth: int, dim: int, heads: int, mlp_ratio: float, num_classes: int, in_chans: int):
    """timm ViT sized for small images: patch = img_size / 8, so 64 patch tokens plus the class token."""
    if img_size % 8:
        raise UserError(f"ViT input size must be a multiple of 8, got {img_size}")
    return VisionTransformer(
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


@register_model
def vit_et(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """The paper's ViT-ET student: 8 blocks, dim 192, 6 heads, MLP 576."""
    return _small_vit(img_size, 8, 192, 6, 3.0, num_classes, in_chans)


@register_model
def vit_tiny_cifar(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """A 6-block, dim-96 ViT small enough for CPU tests and demos."""
    return _small_vit(img_size, 6, 96, 3, 2.0, num_classes, in_chans)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    input_size: int | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The model `name` (see `_build`); every timm VisionTransformer gets its layer-0 tap (`add_layer0`)."""
    model = _build(name, num_classes, in_chans, input_size, pretrained, model_kwargs)
    return add_layer0(model) if isinstance(model, VisionTransformer) else model


def _build(
    name: str,
    num_classes: int,
    in_chans: int,
    input_size: int | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
) -> nn.Module:
    """Builds `name`; `timm:x` goes to `timm.create_model`, `tv:x` to `torchvision.models.get_model`.

    `input_size` reaches built-in models that take `img_size` (ViTs); other models get extra arguments from
    `model_kwargs` only.
    """
    kwargs = dict(model_kwargs or {})
    try:
        if name.startswith("timm:"):
            import timm

            return timm.create_model(
                name[5:], pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
            )
        if name.startswith("tv:"):
            import torchvision

            weights = "DEFAULT" if pretrained else None
            return torchvision.models.get_model(name[3:], weights=weights, num_classes=num_classes, **kwargs)
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


def load_teacher(
    name: str,
    checkpoint: str | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
    num_classes: int,
    input_size: int,
) -> nn.Module:
    """The teacher with its weights; a missing, unreadable or mismatched checkpoint is a UserError."""
    if not name.startswith(PREFIXES):
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
