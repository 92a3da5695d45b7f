"""Model registry: built-in CIFAR-style networks, `timm:<name>` and `tv:<name>`; checkpoints in and out.

Built-in models carry `default_taps`, their generalized layers (stem activation, every block, the flatten) by
module path; other models get theirs discovered by `pipeline.taps`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from timm.models.resnet import BasicBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stride = 1 if i == 0 else 2
            blocks = [_basic_block(in_width, width, stride)] + [_basic_block(width, width, 1) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
            in_width = width
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_width, num_classes)
        self.default_taps = (
            ["stem"] + [f"{s}.{j}" for s, d in zip(self.stage_names, depths) for j in range(d)] + ["pool"]
        )
        self.feature_info = [  # stage ends, as timm describes its models' feature maps
            {"module": f"{s}.{d - 1}", "num_chs": w, "reduction": 2**i}
            for i, (s, d, w) in enumerate(zip(self.stage_names, depths, widths))
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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, path: str | Path, model_spec: dict[str, Any]) -> None:
    """Weights as safetensors; `model_spec` (name, num_classes, ...) goes in the header so a loader can check it."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"kdpipe_model_spec": json.dumps(model_spec, sort_keys=True)})


def read_model_spec(path: str | Path) -> dict[str, Any] | None:
    """The model spec that `save_checkpoint` wrote, or None for checkpoints made elsewhere."""
    if Path(path).suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            spec = (f.metadata() or {}).get("kdpipe_model_spec")
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from err
    return json.loads(spec) if spec else None


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads weights strictly: a missing file, unreadable file or any key/shape mismatch is a UserError.

    Accepts safetensors, or a torch file read with `weights_only=True` (a plain state dict, or one under
    `state_dict` / `model`). Nothing pickled is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as err:  # a pickled model, a renamed file, junk: whatever torch.load meets, one line
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from err
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds no state dict")
    _check_state_matches(model, state, path)
    model.load_state_dict(state, strict=True)


def _check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(
            f"{len(wrong_shape)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})"
        )
    if problems:
        raise UserError(f"checkpoint {path} does not match the model: " + "; ".join(problems))
