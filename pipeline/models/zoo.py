"""Model registry: built-in CIFAR-style networks, `timm:<name>` and `tv:<name>`; `create_model` and `load_teacher`.

Every model, built-in or not, gets its generalized layers discovered by `pipeline.models.taps` from its module tree and
`feature_info`. Every timm VisionTransformer (the built-in ViTs are ones) gains the layer-0 tap `embed`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timm.models.resnet import BasicBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..data.datasets import Preprocessing
from ..engine.checkpoints import load_checkpoint, load_state, read_model_spec, refused_global
from ..errors import UserError, first_line
from ..registry import Registry

log = logging.getLogger(__name__)

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
    """The reference's ResNet initialisation (docs/method.md §5): Kaiming-normal convolutions (fan-out, ReLU), BatchNorm
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
    """ViT layer 0 (docs/method.md §3): the prefix tokens (class, then distillation or register tokens) before the patch
    tokens, positions not yet added. An observation point for taps; the model's forward is unchanged."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def add_layer0(vit: VisionTransformer) -> VisionTransformer:
    """Gives a timm ViT the tap `embed` (no parameters, so checkpoints are unchanged), fed from `patch_embed`."""
    vit.embed = PrefixedPatches()
    # A strong reference (a cycle the collector handles): a deep copy of the model then feeds its own `embed`.
    vit.patch_embed.register_forward_hook(functools.partial(_feed_layer0, vit))
    return vit


def _feed_layer0(vit: VisionTransformer, patch_embed: nn.Module, args, patches: torch.Tensor) -> None:
    if not vit.embed._forward_hooks:  # only a tap on `embed` needs the concatenation
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


@dataclass(frozen=True)
class TeacherBuild:
    """How `load_teacher` built the teacher, as a store records it: the model kwargs actually used (the user's, else
    the checkpoint's spec), the checkpoint entry its weights came from, and whether its weights' classifier head was
    "loaded" or "dropped" (another class count: the model's fresh head is kept)."""

    model_kwargs: dict[str, Any]
    checkpoint_key: str | None = None
    head: str = "loaded"

    @property
    def head_dropped(self) -> bool:
        return self.head == "dropped"


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    input_size: int | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Builds `name`; `timm:x` goes to `timm.create_model`, `tv:x` to `torchvision.models.get_model`.

    `input_size` reaches the models that take `img_size` (built-in and timm ViTs, timm's DeiT, Swin, ...) or
    `image_size` (torchvision's ViTs) unless `model_kwargs` sets it; other models get extra arguments from
    `model_kwargs` only. Pretrained weights fit any class count: a head of another size is replaced by a fresh one.
    Every timm VisionTransformer gets its layer-0 tap (`add_layer0`).
    """
    return _build(name, num_classes, in_chans, input_size, pretrained, model_kwargs)[0]


def _build(
    name: str,
    num_classes: int,
    in_chans: int,
    input_size: int | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
) -> tuple[nn.Module, str]:
    """(model, the pretrained head's fate: "loaded" or "dropped"); see `create_model`."""
    model, head = _construct(name, num_classes, in_chans, input_size, pretrained, dict(model_kwargs or {}))
    return (add_layer0(model) if isinstance(model, VisionTransformer) else model), head


def _construct(
    name: str, num_classes: int, in_chans: int, input_size: int | None, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, str]:
    prefix, rest = split_namespace(name)
    try:
        if prefix == "timm:":
            import timm

            def build(**kw) -> nn.Module:
                return timm.create_model(rest, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kw)

            model = _sized(build, "img_size", input_size, kwargs)
            return model, _timm_pretrained_head(model, name, num_classes) if pretrained else "loaded"
        if prefix == "tv:":
            import torchvision

            def build(**kw) -> nn.Module:
                return torchvision.models.get_model(rest, weights=None, num_classes=num_classes, **kw)

            model = _sized(build, "image_size", input_size, kwargs)
            return model, _load_torchvision_weights(model, name, num_classes) if pretrained else "loaded"
        factory = MODELS.get(name)
        if pretrained:
            raise UserError(f"built-in model {name!r} has no pretrained weights; pass --checkpoint")
        if input_size is not None and "img_size" in inspect.signature(factory).parameters:
            kwargs.setdefault("img_size", input_size)
        return factory(num_classes=num_classes, in_chans=in_chans, **kwargs), "loaded"
    except UserError:
        raise
    except Exception as err:  # unknown timm/torchvision names, bad kwargs, pretrained weights not cached, ...
        raise UserError(f"cannot create model {name!r}: {first_line(err)}") from err


def _timm_pretrained_head(model: nn.Module, name: str, num_classes: int) -> str:
    """The pretrained head's fate: timm itself leaves out a classifier of another class count (`load_pretrained`)."""
    classes = model.pretrained_cfg.get("num_classes", num_classes)
    if classes == num_classes:
        return "loaded"
    log.info("%s: its pretrained head has %d classes, the dataset %d: keeping a fresh head", name, classes, num_classes)
    return "dropped"


def _load_torchvision_weights(model: nn.Module, name: str, num_classes: int) -> str:
    """Loads torchvision's default weights for `name` from the torch hub cache (or downloads them), read with
    weights_only=True, dropping a head of another class count; returns the head's fate. Weights that cannot be had
    are a UserError."""
    import torch.hub
    import torchvision

    weights = torchvision.models.get_model_weights(name[3:]).DEFAULT
    try:
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused the cached file
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        found = refused_global(cached) if cached.is_file() else None
        refused = f" ({found})" if found else ""
        raise UserError(
            f"cannot load the pretrained weights of {name!r} ({weights}): {cached} is not plain weights that "
            f"weights_only=True reads{refused}; delete it to download it again"
        ) from err
    except Exception as err:  # offline and not cached, a broken download, ...
        raise UserError(
            f"cannot load the pretrained weights of {name!r} ({weights}): not in the torch hub cache "
            f"{torch.hub.get_dir()} and not downloadable ({first_line(err)})"
        ) from err
    return load_state(model, state, f"torchvision's {weights}", num_classes)


def _sized(build: Callable[..., nn.Module], size_kwarg: str, input_size: int | None, kwargs: dict) -> nn.Module:
    """`build(**kwargs)`, with `size_kwarg=input_size` (timm's `img_size`, torchvision's `image_size`) where the
    model's class takes it and `kwargs` do not set it.

    timm's and torchvision's builders take `**kwargs` and pass them on to the class, so their signatures cannot tell;
    a class without the parameter refuses it by name, and that refusal, only that, builds the model without it.
    """
    if input_size is None or size_kwarg in kwargs:
        return build(**kwargs)
    try:
        return build(**kwargs, **{size_kwarg: input_size})
    except TypeError as err:  # Python's "unexpected keyword argument 'img_size'", or timm's "... argument(s): [...]"
        if size_kwarg not in str(err):
            raise
    return build(**kwargs)


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
    checkpoint_key: str | None = None,
) -> tuple[nn.Module, TeacherBuild]:
    """The teacher with its weights, and how it was built; a missing, unreadable or mismatched checkpoint is a
    UserError. Weights whose head has another class count than the dataset's load without it (`head` "dropped").

    Without `model_kwargs` the checkpoint's spec (written by `save_checkpoint`) supplies them; `checkpoint_key` picks
    the entry of a torch checkpoint that holds the state dict (see `load_checkpoint`).
    """
    if not split_namespace(name)[0]:
        MODELS.get(name)  # an unknown name is reported before anything is read
    if checkpoint is None and not pretrained:
        raise UserError("the teacher needs weights: pass --checkpoint=FILE (or --pretrained for timm/torchvision)")
    if checkpoint_key and not checkpoint:
        raise UserError(f"--checkpoint-key={checkpoint_key}: there is no --checkpoint to read it from")
    spec = read_model_spec(checkpoint) if checkpoint and Path(checkpoint).is_file() else None
    if spec and spec.model != name:
        raise UserError(f"checkpoint {checkpoint} holds a {spec.model!r}, not a {name!r}")
    if spec and not model_kwargs:
        model_kwargs = spec.model_kwargs or None
    model, head = _build(name, num_classes, 3, input_size, pretrained, model_kwargs)
    key = None
    if checkpoint:
        loaded = load_checkpoint(model, checkpoint, checkpoint_key, num_classes)
        key, head = loaded.key, loaded.head
    return model, TeacherBuild(dict(model_kwargs or {}), key, head)
