"""Feature taps: named module outputs, in depth (execution) order, with their per-sample shapes.

A tap is addressed by module path (`layer3.1`, `blocks.7`), as in torchdistill. `TapRecorder` captures tap
outputs with forward hooks and stops the forward pass after the last tap when the logits are not wanted;
`dry_forward` runs a model once on a small zero batch, for the taps' shapes and to check its input size and logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError, first_line

# Leaf layers never count as blocks, even when they sit in a Sequential.
_PRIMITIVES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)
DRY_BATCH = 2  # images in a dry forward pass: two, so that logits must keep a batch axis


@dataclass(frozen=True)
class Tap:
    index: int
    name: str
    shape: tuple[int, ...]  # per sample: (C, H, W) for maps, (T, D) for tokens, (D,) for vectors

    @property
    def kind(self) -> str:
        return {3: "map", 2: "tokens", 1: "vector"}.get(len(self.shape), "other")


def candidate_taps(model: nn.Module) -> list[str]:
    """The model's generalized layers by module path, in no particular order.

    Built-in models declare them (`default_taps`). Otherwise: the outermost parameterised, non-primitive
    children of Sequential/ModuleList containers (residual, inverted-residual and transformer blocks), plus
    timm `feature_info` modules outside them (e.g. the stem activation); a plain conv stack (VGG) falls back to
    its activations.
    """
    if hasattr(model, "default_taps"):
        return list(model.default_taps)
    blocks: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        if any(_inside(parent_name, b) for b in blocks):
            continue
        for child_name, child in parent.named_children():
            if not isinstance(child, _PRIMITIVES + _ACTIVATIONS) and any(True for _ in child.parameters()):
                blocks.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    extra = [m for m in _feature_modules(model) if not any(_inside(m, b) or _inside(b, m) for b in blocks)]
    taps = blocks + extra
    if not taps:
        taps = [n for n, m in model.named_modules() if isinstance(m, _ACTIVATIONS)]
    return taps


def _inside(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def _feature_modules(model: nn.Module) -> list[str]:
    """The module paths of a timm-style `feature_info` (stage ends, stem first), if the model declares one."""
    return [
        info["module"] for info in getattr(model, "feature_info", []) if isinstance(info, dict) and info.get("module")
    ]


def stage_end_taps(taps: list[Tap], model: nn.Module) -> list[str]:
    """The taps ending each `feature_info` stage: the stage module itself, or the deepest tap inside it."""
    ends = []
    for module in _feature_modules(model):
        inside = [t.name for t in taps if _inside(t.name, module)]
        if inside:
            ends.append(inside[-1])
    return ends


class StopForward(Exception):
    """Raised by the last hook so the network does not run past the last requested tap."""


class TapRecorder:
    """Records the outputs of named modules during a forward pass.

    with TapRecorder(model, ["layer1.0", "pool"], stop_after_last=True) as rec:
        feats = rec.run(x)   # {"layer1.0": tensor, "pool": tensor}; rec.logits is None when stopped early
    """

    def __init__(self, model: nn.Module, names: list[str], stop_after_last: bool = False) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            raise UserError(f"unknown tap {unknown[0]!r} for this model; `kdpipe layers MODEL` lists the taps")
        self.model = model
        self.names = list(names)
        self.stop_after_last = stop_after_last
        self._modules = [modules[n] for n in names]
        self._handles: list = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.logits: torch.Tensor | None = None

    def attach(self) -> TapRecorder:
        """Registers the hooks (idempotent); a module that trains through its taps keeps them attached."""
        if not self._handles:
            for name, module in zip(self.names, self._modules, strict=True):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> TapRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise UserError(f"tap {name!r} outputs {type(output).__name__}, not a tensor; choose another module")
            if name not in self.outputs:  # a module called twice keeps its first output
                self.outputs[name] = output
                self.order.append(name)
            if self.stop_after_last and len(self.outputs) == len(self.names):
                raise StopForward

        return hook

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.outputs, self.order, self.logits = {}, [], None
        try:
            self.logits = self.model(x)
        except StopForward:
            pass
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise UserError(f"tap {missing[0]!r} never ran in the forward pass")
        return {n: self.outputs[n] for n in self.names}


def list_taps(
    model: nn.Module, input_size: int, in_chans: int = 3, names: list[str] | None = None, num_classes: int | None = None
) -> list[Tap]:
    """Taps (all candidates, or `names`) with shapes, sorted by execution order, from one `dry_forward` (which
    checks the logits too when given `num_classes`)."""
    names = candidate_taps(model) if names is None else list(names)
    if not names:
        raise UserError("no taps found for this model; name modules explicitly with --layers")
    rec = dry_forward(model, input_size, names, num_classes, in_chans)
    return [Tap(i, n, tuple(rec.outputs[n].shape[1:])) for i, n in enumerate(rec.order)]


def dry_forward(
    model: nn.Module,
    input_size: int,
    names: list[str] | tuple[str, ...] = (),
    num_classes: int | None = None,
    in_chans: int = 3,
) -> TapRecorder:
    """One forward pass of a small zero batch in eval mode without gradients, recording the taps `names`; the
    model's mode and the random state are left as they were, so a run that checks its model first trains alike.

    Without `num_classes` the pass stops after the last tap; with it, it runs to the end and the output must be
    a (batch, num_classes) logits tensor. A model that fails on the input size or returns anything else is a
    UserError.
    """
    was_training, device = model.training, _device_of(model)
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            TapRecorder(model, list(names), stop_after_last=num_classes is None) as rec,
        ):
            try:
                rec.run(torch.zeros(DRY_BATCH, in_chans, input_size, input_size, device=device))
            except (RuntimeError, AssertionError) as err:
                raise UserError(
                    f"the model does not accept {input_size}x{input_size} inputs: {first_line(err)}"
                ) from err
    finally:
        model.train(was_training)
    if num_classes is not None:
        _check_logits(rec.logits, num_classes, input_size)
    return rec


def _check_logits(logits, num_classes: int, input_size: int) -> None:
    hint = "check the model and --model-kwargs"
    if not isinstance(logits, torch.Tensor):
        kind = type(logits).__name__
        raise UserError(f"the model's output ({kind}) is not a logits tensor of shape (batch, {num_classes}); {hint}")
    if tuple(logits.shape) != (DRY_BATCH, num_classes):
        raise UserError(
            f"the model's output for {DRY_BATCH} images of {input_size}x{input_size} has shape {tuple(logits.shape)}, "
            f"not ({DRY_BATCH}, {num_classes}) (batch, classes); {hint}"
        )


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
