"""Feature taps: named module outputs in depth (execution) order, with their per-sample shapes, layouts and roles.

A tap is addressed by module path (`layer3.1`, `blocks.7`), as in torchdistill. Every tap carries its layout, read
from the model (timm's `output_fmt`, `num_prefix_tokens`, `patch_embed.grid_size`) or probed from its shape:

    NCHW  a map (C, H, W)            NHWC  a channels-last map (H, W, C), e.g. timm Swin
    NLC   tokens (T, D): `prefix_tokens` (class, distillation, register) then the patches of `grid` in row-major order
    NC    a vector (D,)

and its role among the model's generalized layers (docs/method.md): the stem, a layer (a residual, inverted-residual
or transformer block; the activations of a plain conv stack; the final conv before the global pool), a stage end
(the last block of a stage), the flatten.
`TapRecorder` captures tap outputs with forward hooks and stops the forward pass after the last tap when the logits
are not wanted; `dry_forward` runs a model once on a small zero batch, for the taps and to check its input size and
logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, replace
from itertools import groupby
from typing import Any

import torch
from torch import nn

from ..errors import UserError, first_line

LAYOUTS = ("NCHW", "NHWC", "NLC", "NC")  # timm's names (timm.layers.Format)
STEM, LAYER, STAGE_END, FLATTEN = "stem", "layer", "stage end", "flatten"
LAYER0 = "embed"  # the module path of the ViT layer-0 tap that pipeline.models.zoo adds
STEM_NAME = "stem"  # timm's name for a model's stem module
SIZE_KWARGS = ("img_size", "image_size")  # a model class's argument that fixes its input size: timm's, torchvision's
MAX_PREFIX_TOKENS = 16  # more leading non-patch tokens than this and the tokens are not read as a patch grid

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
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d)  # the stem is what feeds these
_FLATTEN_MODULES = ("global_pool", "head.global_pool", "avgpool", "pool")  # timm, timm heads, torchvision, built-ins
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # what pools features for the head, whatever its name

# Isotropic transformers have no stages; docs/method.md §2 gives their "stage ends" by block (layer = block + 1, layer 0
# being the patch embedding): ViT-B's layers 2, 4, 8, 10 and ViT-ET's layers 1, 3, 5, 7. Other depths follow
# ViT-ET's rule: every other block from the first, the last block left to the classifier.
ISOTROPIC_STAGE_BLOCKS = {12: (1, 3, 7, 9), 8: (0, 2, 4, 6)}
DRY_BATCH = 2  # images in a dry forward pass: two, so that logits and taps must keep a batch axis


@dataclass(frozen=True)
class Tap:
    """One tap: its depth index, module path, per-sample shape, layout and role (see the module docstring).

    A Tap built from a shape alone gets the layout its shape implies (`infer_layout`), as stores written before
    layouts were recorded are read.
    """

    index: int
    name: str
    shape: tuple[int, ...]
    layout: str = ""
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    role: str = LAYER

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if not self.layout:
            layout, prefix, grid = infer_layout(self.shape)
            object.__setattr__(self, "layout", layout)
            object.__setattr__(self, "prefix_tokens", prefix)
            object.__setattr__(self, "grid", grid)
        if self.layout not in LAYOUTS:
            raise UserError(f"tap {self.name}: unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(self.grid))

    @property
    def kind(self) -> str:
        return {"NCHW": "map", "NHWC": "map", "NLC": "tokens", "NC": "vector"}[self.layout]

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.layout in ("NHWC", "NLC", "NC") else self.shape[0]

    @property
    def spatial(self) -> tuple[int, ...] | None:
        """(H, W) of a map or of the patch grid of tokens; None for vectors and tokens without a grid."""
        if self.layout == "NCHW":
            return self.shape[1:]
        if self.layout == "NHWC":
            return self.shape[:2]
        return self.grid

    @property
    def pairable(self) -> bool:
        """A default pairing candidate: a layer or stage end that is not a vector."""
        return self.role in (LAYER, STAGE_END) and self.layout != "NC"

    def record(self) -> dict[str, Any]:
        """The tap as the store records it (identity `taps`)."""
        record = asdict(self)
        record.update(shape=list(self.shape), grid=list(self.grid) if self.grid else None, kind=self.kind)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Tap:
        known = {k: record[k] for k in ("layout", "prefix_tokens", "grid", "role") if record.get(k) is not None}
        return cls(record["index"], record["name"], tuple(record["shape"]), **known)

    def describe(self) -> str:
        """The layout in words, e.g. `NLC, 1 prefix + 8x8 grid`."""
        if self.layout != "NLC":
            return self.layout
        grid = f"{self.grid[0]}x{self.grid[1]} grid" if self.grid else "no grid"
        return f"NLC, {self.prefix_tokens} prefix + {grid}" if self.prefix_tokens else f"NLC, {grid}"


@dataclass(frozen=True)
class LayoutHints:
    """What a model says about its outputs: channels-last maps, prefix tokens, the patch grid."""

    channels_last: bool = False
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None

    @classmethod
    def of(cls, model: nn.Module) -> LayoutHints:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        prefix = getattr(model, "num_prefix_tokens", None)
        return cls(
            channels_last=str(getattr(model, "output_fmt", "")) in ("NHWC", "Format.NHWC"),
            prefix_tokens=prefix if isinstance(prefix, int) else None,
            grid=tuple(grid) if grid is not None and len(grid) == 2 else None,
        )


def infer_layout(shape: tuple[int, ...], hints: LayoutHints = LayoutHints()) -> tuple[str, int, tuple | None]:
    """(layout, prefix tokens, grid) for a per-sample shape: the shape decides where it can, the hints break ties.

    A 3-D shape (a, b, c) is NHWC when a == b != c (a square grid before the channels), NCHW when b == c != a, and
    the model's `output_fmt` decides (a, a, a); tokens are a patch grid after a few prefix tokens when the count
    allows one (the model's own grid and prefix count first, else a square grid after 0..16 prefix tokens).
    """
    if len(shape) == 1:
        return "NC", 0, None
    if len(shape) == 2:
        return ("NLC", *_token_grid(shape[0], hints))
    if len(shape) == 3:
        a, b, c = shape
        channels_last = (a == b != c) or (a == b == c and hints.channels_last)
        return ("NHWC" if channels_last else "NCHW"), 0, None
    raise UserError(f"a tap of per-sample shape {shape} is neither a map, tokens nor a vector; choose another module")


def _token_grid(tokens: int, hints: LayoutHints) -> tuple[int, tuple[int, int] | None]:
    if hints.grid and 0 <= tokens - math.prod(hints.grid) <= MAX_PREFIX_TOKENS:
        return tokens - math.prod(hints.grid), hints.grid
    preferred = [hints.prefix_tokens] if hints.prefix_tokens is not None else []
    for prefix in preferred + list(range(MAX_PREFIX_TOKENS + 1)):
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 0 and side * side == tokens - prefix:
            return prefix, (side, side)
    return 0, None


def candidate_taps(model: nn.Module) -> list[str]:
    """The model's blocks by module path, in no particular order (`list_taps` adds the stem, the final conv before
    the global pool and the flatten, and orders them).

    Layers are the parameterised, non-primitive members of containers (Sequential, ModuleList) at any depth, and of
    stage modules (timm `feature_info` entries of different reductions) that hold blocks: containers of containers
    (EfficientNet's groups of blocks) and such stages (ConvNeXt's, holding `blocks`; RegNet's, holding b1..bn) are
    opened; a stage entry that is one block (Hiera's, ReXNet's, Inception's) is a layer itself, and so is a bare
    Sequential block in a container (ConvMixer's); other modules outside containers (torchvision's ViT encoder) are
    searched through; a layer's own modules are never layers. Where blocks come in groups, the members beside the
    groups are transitions, not layers (a stage's downsample layer, torchvision Swin's patch mergings between its
    stages), and the model's `stem` (timm's name for it) is never opened. A model without containers (Inception) has
    its own children as layers; a plain conv stack (VGG) falls back to its activations.
    """
    stages = set(_stage_modules(model))
    blocks = _blocks(model, "", stages, opened=False)
    if all("." not in b for b in blocks) and not any(_is_container(m) and _has_parameters(m) for m in model.modules()):
        blocks = _blocks(model, "", stages, opened=True)
    if not blocks:
        blocks = [n for n, m in model.named_modules() if isinstance(m, _ACTIVATIONS)]
    return blocks


def _blocks(module: nn.Module, path: str, stages: set[str], opened: bool) -> list[str]:
    """The blocks below `module`; its own non-container children are blocks when `module` is opened."""
    members, nested = [], []
    for name, child in _members(module):
        child_path = f"{path}.{name}" if path else name
        if not path and name == STEM_NAME:
            continue  # the stem is found by list_taps, never split into layers
        if _groups_blocks(child, child_path, stages, opened):
            nested += _blocks(child, child_path, stages, opened=True)
        elif opened or child_path in stages:
            members.append(child_path)
        else:
            nested += _blocks(child, child_path, stages, opened=False)
    if opened and nested:
        # Blocks come in groups here (a stage's container of blocks, Swin's stages between its patch mergings): the
        # members beside the groups (downsample layers, patch mergings, norms) are transitions, not blocks.
        return nested
    return members + nested


def _groups_blocks(child: nn.Module, child_path: str, stages: set[str], parent_opened: bool) -> bool:
    """Whether `child` is opened for the blocks inside: a container that is not itself a block, or a stage holding
    blocks."""
    if _is_container(child):
        return not (parent_opened and _is_bare_block(child))
    return child_path in stages and _holds_blocks(child)


def _is_bare_block(container: nn.Module) -> bool:
    """Whether a container is one block rather than a group of blocks: one composite module with weighted layers of
    its own beside it (ConvMixer's `Sequential(Residual(...), conv, act, norm)`). A group holds several composite
    modules (a stage's blocks, SqueezeNet's Fires) or composite modules only (a stage of one block)."""
    composite = [child for _, child in _members(container) if not _is_container(child)]
    weighted = [c for c in container.children() if isinstance(c, _PRIMITIVES) and _has_parameters(c)]
    return len(composite) == 1 and bool(weighted)


def _members(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children that may be blocks: parameterised, and neither primitive layers nor activations."""
    return [
        (name, child)
        for name, child in module.named_children()
        if not isinstance(child, _PRIMITIVES + _ACTIVATIONS) and _has_parameters(child)
    ]


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, _CONTAINERS)


def _holds_blocks(stage: nn.Module) -> bool:
    """A stage module holds blocks when a member is one of several composite modules (RegNet's bottlenecks), or a
    container of composite modules (ConvNeXt's `blocks`); a single block's members (conv units, attention, MLP)
    are made of primitive layers only."""
    for _, child in _members(stage):
        inner = [m for _, m in _members(child)] if _is_container(child) else [child]
        if any(_members(m) for m in inner):
            return True
    return False


def _inside(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def _feature_modules(model: nn.Module) -> list[str]:
    """The module paths of a timm-style `feature_info` (stage ends, maybe a stem first), if the model declares one."""
    return [m for m, _ in _feature_reductions(model)]


def _stage_modules(model: nn.Module) -> list[str]:
    """`feature_info` modules that are stages: only when they differ in reduction (a ViT lists every block at one
    reduction; those are blocks, not stages to open)."""
    entries = _feature_reductions(model)
    return [m for m, _ in entries] if len({r for _, r in entries}) > 1 else []


def _feature_reductions(model: nn.Module) -> list[tuple[str, int | None]]:
    info = getattr(model, "feature_info", None)
    entries = getattr(info, "info", info) or []  # timm's FeatureInfo wraps the list
    modules = dict(model.named_modules())
    return [
        (e["module"], e.get("reduction"))
        for e in entries
        if isinstance(e, dict) and e.get("module") and e["module"] in modules
    ]


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


_Produced = tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]  # (module path, module, its output, its input)


class _Trace:
    """One dry run with a hook on every module: the order modules finish in, the outputs of the modules `keep`
    names, the tensors produced before the first block starts (the stem is found among them) and those produced
    after the last block and before the global pool (the head conv is found among them).

    Stops once every module of `keep` has run and the global pool has started, unless asked to run `to_the_end`
    (then `logits` holds the output); a model that pools in its forward function runs to the end. Holding the
    tensors keeps their ids unique.
    """

    def __init__(self, model: nn.Module, keep: set[str], blocks: set[str], to_the_end: bool) -> None:
        self.model, self.keep, self.blocks, self.to_the_end = model, keep, blocks, to_the_end
        self.logits: Any = None
        self.finished: list[str] = []
        self.outputs: dict[str, Any] = {}
        self.producers: list[_Produced] = []
        self.block_input: torch.Tensor | None = None
        self.tail: list[_Produced] = []  # since the latest block finished, until a global pool starts
        self.pooled = False
        self._handles: list = []

    def run(self, x: torch.Tensor) -> _Trace:
        for name, module in self.model.named_modules():
            if name:
                self._handles.append(module.register_forward_pre_hook(self._before(name)))
                self._handles.append(module.register_forward_hook(self._after(name)))
        try:
            self.logits = self.model(x)
        except StopForward:
            pass
        finally:
            for handle in self._handles:
                handle.remove()
        return self

    def _before(self, name: str):
        def hook(module, args) -> None:
            if self.block_input is None and name in self.blocks and args and isinstance(args[0], torch.Tensor):
                self.block_input = args[0]
            if isinstance(module, _GLOBAL_POOLS) or name in _FLATTEN_MODULES:
                self.pooled = True

        return hook

    def _after(self, name: str):
        def hook(module, args, output) -> None:
            self.finished.append(name)
            if name in self.keep and name not in self.outputs:  # a module called twice keeps its first output
                self.outputs[name] = output
            given = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if self.blocks and self.block_input is None and isinstance(output, torch.Tensor):
                self.producers.append((name, module, output, given))
            if name in self.blocks:  # a pool inside a block (squeeze-excitation) is not the global pool
                self.tail, self.pooled = [], False
            elif self.block_input is not None and not self.pooled and isinstance(output, torch.Tensor):
                self.tail.append((name, module, output, given))
            done = self.keep <= self.outputs.keys() and self.block_input is not None and self.pooled
            if done and not self.to_the_end:
                raise StopForward

        return hook

    def stem(self) -> str | None:
        """The module whose output enters the first block: the last to produce that tensor (an in-place activation
        after its norm, a Sequential after its members), looking through identities, dropout and pooling."""
        wanted, seen = self.block_input, set()
        while wanted is not None and id(wanted) not in seen:
            seen.add(id(wanted))
            found = [p for p in self.producers if p[2] is wanted]
            made = [p for p in found if not isinstance(p[1], _PASS_THROUGH)]
            if made:
                name, _, output, _ = made[-1]
                self.outputs.setdefault(name, output)
                return name
            wanted = found[-1][3] if found else None  # through a pooling layer to what fed it
        return None

    def head_conv(self) -> str | None:
        """The final conv unit before the global pool (torchvision's last 1x1 conv, timm's `conv_head` with `bn2`):
        the last module after the last block that holds a convolution and no block, followed through the modules
        that take its output (a norm, an activation) to the last of them."""
        units = [i for i, (name, module, _, _) in enumerate(self.tail) if _has_conv(module) and not self._holds(name)]
        if not units:
            return None
        name, _, output, _ = self.tail[units[-1]]
        for later, _, made, given in self.tail[units[-1] + 1 :]:
            if given is output and not self._holds(later):
                name, output = later, made
        self.outputs.setdefault(name, output)
        return name

    def _holds(self, name: str) -> bool:
        """Whether module `name` holds a block (a stage, the model's `features`)."""
        return any(_inside(block, name) for block in self.blocks)


def list_taps(
    model: nn.Module, input_size: int, in_chans: int = 3, names: list[str] | None = None, num_classes: int | None = None
) -> list[Tap]:
    """Taps (the generalized layers, or `names`) with shapes, layouts and roles, in execution order, from one
    `dry_forward` (which checks the logits too when given `num_classes`). Roles always come from the whole model,
    whichever taps are asked for."""
    layers = candidate_taps(model)
    modules = dict(model.named_modules())
    flatten = next((n for n in _FLATTEN_MODULES if n in modules), None)
    declared_stem = LAYER0 if LAYER0 in modules else None  # the layer-0 tap pipeline.models.zoo.add_layer0 adds to ViTs
    named_stem = STEM_NAME if STEM_NAME in dict(model.named_children()) else None
    extra = [n for n in (flatten, declared_stem, named_stem) if n]
    asked = list(names) if names is not None else layers + extra
    if not asked:
        raise UserError("no taps found for this model; name modules explicitly with --layers")
    unknown = [n for n in asked if n not in modules or n == ""]
    if unknown:
        raise UserError(f"unknown tap {unknown[0]!r} for this model; `kdpipe layers MODEL` lists the taps")
    # Stage modules are run too: one holding no layer (MobileViT's final_conv) ends the stage before it.
    keep = set(layers + extra + asked + _feature_modules(model))
    trace = dry_forward(model, input_size, keep, set(layers), num_classes, in_chans)
    plain_stack = all(isinstance(modules[n], _ACTIVATIONS) for n in layers)  # VGG: its first ReLU is layer 0
    stem = declared_stem or (None if plain_stack else _stem(model, trace, layers, named_stem))
    head_conv = trace.head_conv()  # a layer, no stage end: the head's in docs/method.md §4 and timm's feature_info
    shapes = _tap_shapes(trace.outputs, names or ())
    hints = _probed_hints(LayoutHints.of(model), shapes.values())
    described = {name: Tap(0, name, shape, *infer_layout(shape, hints)) for name, shape in shapes.items()}
    order = [n for n in dict.fromkeys(trace.finished) if n in described]
    if names is None and not any(n in described for n in layers):
        raise UserError("no layer of this model outputs a per-sample tensor (its blocks return tuples?); pass --layers")
    roles = _roles(model, [described[n] for n in order if n in layers or n in (stem, flatten)], stem, flatten, trace)
    chosen = set(names) if names is not None else set(layers) | ({stem, flatten, head_conv} - {None})
    return [
        replace(described[n], index=i, role=roles.get(n, LAYER)) for i, n in enumerate(o for o in order if o in chosen)
    ]


def _tap_shapes(outputs: dict[str, Any], asked: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the outputs that are taps; an asked-for module whose output is none is an error."""
    shapes = {}
    for name, output in outputs.items():
        problem = _not_a_tap(output)
        if problem and name in asked:
            raise UserError(f"tap {name!r} {problem}; choose another module")
        if not problem:
            shapes[name] = tuple(output.shape[1:])
    missing = [n for n in asked if n not in shapes]
    if missing:
        raise UserError(f"tap {missing[0]!r} never ran in the forward pass")
    return shapes


def _probed_hints(hints: LayoutHints, shapes) -> LayoutHints:
    """Where the model does not say its maps are channels-last, its unambiguous maps do: (a, a, a) taps of a model
    whose other maps are all NHWC are NHWC too."""
    if hints.channels_last:
        return hints
    layouts = {infer_layout(s)[0] for s in shapes if len(s) == 3 and len(set(s)) > 1}
    return replace(hints, channels_last=True) if layouts == {"NHWC"} else hints


def _not_a_tap(output: Any) -> str | None:
    if not isinstance(output, torch.Tensor):
        return f"outputs {type(output).__name__}, not a tensor"
    if output.dim() < 2 or output.shape[0] != DRY_BATCH:
        return f"folds the batch into its first axis (shape {tuple(output.shape)} for a batch of {DRY_BATCH})"
    return None


def _stem(model: nn.Module, trace: _Trace, layers: list[str], named_stem: str | None) -> str | None:
    """The stem: the first `feature_info` entry when it runs before any block and lies outside them (timm's
    `act1`, `bn1`), else the model's `stem` module, else the module whose output enters the first block."""
    first = next(iter(_feature_modules(model)), None)
    if first and first in trace.outputs and not any(_inside(first, b) or _inside(b, first) for b in layers):
        if any(p[0] == first for p in trace.producers):  # it finished before the first block started
            return first
    return named_stem or trace.stem()


def _roles(model: nn.Module, taps: list[Tap], stem: str | None, flatten: str | None, trace: _Trace) -> dict[str, str]:
    roles = {t.name: LAYER for t in taps}
    if stem:
        roles[stem] = STEM
    if flatten in roles:
        roles[flatten] = FLATTEN
    body = [t for t in taps if roles[t.name] == LAYER and t.layout != "NC"]
    for name in _stage_ends(model, body, stem, trace):
        roles[name] = STAGE_END
    return roles


def _stage_ends(model: nn.Module, body: list[Tap], stem: str | None, trace: _Trace) -> list[str]:
    """The last layer of each stage: from timm `feature_info` when it has stages of several reductions, else where the
    spatial size changes; isotropic transformers (one size throughout) follow ISOTROPIC_STAGE_BLOCKS."""
    stages = [(m, r) for m, r in _feature_reductions(model) if m != stem]
    if len({r for _, r in stages}) > 1:
        return list(dict.fromkeys(end for end in (_stage_end(m, body, trace) for m, _ in stages) if end))
    groups = [list(g) for _, g in groupby(body, key=lambda t: t.spatial)]
    if len(groups) > 1:
        return [g[-1].name for g in groups]
    blocks = [t.name for t in body]
    chosen = ISOTROPIC_STAGE_BLOCKS.get(len(blocks), range(0, len(blocks) - 1, 2))
    return [blocks[i] for i in chosen]


def _stage_end(module: str, body: list[Tap], trace: _Trace) -> str | None:
    """The deepest layer inside a stage module, the layer enclosing a stage entry inside one, or (for a stage entry
    that holds none, such as MobileViT's `final_conv`) the last layer that ran before it."""
    inside = [t.name for t in body if _inside(t.name, module) or _inside(module, t.name)]
    if inside:
        return inside[-1]  # the deepest layer inside the stage, or the layer the stage entry lies in (Xception)
    if module not in trace.finished:
        return None
    before = set(trace.finished[: trace.finished.index(module)])
    earlier = [t.name for t in body if t.name in before]
    return earlier[-1] if earlier else None


def dry_forward(
    model: nn.Module,
    input_size: int,
    keep: set[str] | frozenset[str] = frozenset(),
    blocks: set[str] | frozenset[str] = frozenset(),
    num_classes: int | None = None,
    in_chans: int = 3,
) -> _Trace:
    """One forward pass of DRY_BATCH zero images in eval mode without gradients, traced (`_Trace`); the model's mode
    and the random state are left as they were, so a run that checks its model first trains alike.

    Without `num_classes` the pass stops once the modules in `keep` have run; with it, it runs to the end and the
    output must be a (batch, num_classes) logits tensor. A model that fails on the input size or returns anything
    else is a UserError.
    """
    was_training, device = model.training, _device_of(model)
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            dummy = torch.zeros(DRY_BATCH, in_chans, input_size, input_size, device=device)
            try:
                trace = _Trace(model, set(keep), set(blocks), to_the_end=num_classes is not None).run(dummy)
            except UserError:
                raise
            except Exception as err:  # shape errors, asserts on the image size, anything a forward may raise
                raise UserError(
                    f"the model does not accept {input_size}x{input_size} inputs: {first_line(err)}"
                    f"{_size_hint(model, input_size)}"
                ) from err
    finally:
        model.train(was_training)
    if num_classes is not None:
        _check_logits(trace.logits, num_classes, input_size)
    return trace


def _size_hint(model: nn.Module, input_size: int) -> str:
    """Where the model's class is built for one input size, the argument that sets it, as a remedy to a refusal."""
    parameters = inspect.signature(type(model).__init__).parameters
    kwarg = next((k for k in SIZE_KWARGS if k in parameters), None)
    return f"; it is built for one size: pass --model-kwargs '{{\"{kwarg}\": {input_size}}}'" if kwarg else ""


def _check_logits(logits: Any, num_classes: int, input_size: int) -> None:
    hint = "check the model and --model-kwargs"
    if not isinstance(logits, torch.Tensor):
        kind = type(logits).__name__
        raise UserError(f"the model's output ({kind}) is not a logits tensor of shape (batch, {num_classes}); {hint}")
    if tuple(logits.shape) != (DRY_BATCH, num_classes):
        raise UserError(
            f"the model's output for {DRY_BATCH} images of {input_size}x{input_size} has shape {tuple(logits.shape)}, "
            f"not ({DRY_BATCH}, {num_classes}) (batch, classes); {hint}"
        )


def stage_ends(taps: list[Tap]) -> list[Tap]:
    """The stage ends among `taps`, in depth order (never a vector, the stem or the flatten)."""
    return [t for t in taps if t.role == STAGE_END]


# Global average pooling per layout: maps over space, tokens over all tokens (class token included, docs/method.md §4).
POOLED_AXES = {"NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,), "NC": ()}


def pool_embedding(features: torch.Tensor, layout: str) -> torch.Tensor:
    """One vector per sample: a batch of tap outputs averaged over their spatial or token axes."""
    axes = POOLED_AXES[layout]
    return features.mean(dim=axes) if axes else features


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
