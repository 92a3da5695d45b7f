"""Block-KD's stepping stones (docs/method.md §6): the student's first i stages, a connector, the frozen teacher's tail.

Stone i is `N_i = T_c ∘ T_n ∘ … ∘ T_{i+1} ∘ C_i ∘ S_i ∘ … ∘ S_1`. The student's stage outputs come from its own
forward pass (the stones share S_1..S_i with the student); a trained connector C_i maps stage i's output onto the
teacher's stage-i shape and layout; the teacher's tail from stage i runs from there to its logits.

How the teacher runs "from stage i": its forward is traced with torch.fx, its stage-end modules kept whole, and the
tail is cut out of the graph as everything the logits need downstream of stage i's output. The cut is refused when
the tail needs anything computed before stage i other than the model's own parameters and buffers: the input image,
an earlier activation (a skip connection that jumps over the stage end, DenseNet-style concatenation), or a stage
module called more than once. So the stone is valid exactly for models whose computation after a stage end depends
on that stage's output alone (ResNets, VGG, MobileNets, EfficientNets, ConvNeXt, ViTs from a block); the early stages
never run for a stone, which keeps them out of the cost. Models torch.fx cannot trace are refused. Each tail is
checked once on a dry batch: the tail of the teacher's own stage-i output must give the teacher's own logits.

The teacher is frozen: eval mode, no parameter gradients, and kept out of the stones' parameters and state_dict
(it is the store's teacher, not something a run trains or saves), while gradients flow through it to the
connectors and the student.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn

from ..errors import UserError, first_line
from ..models.taps import DRY_BATCH, Tap, TapRecorder
from ..registry import Registry
from .alignment import grid_parts

log = logging.getLogger(__name__)

CONNECTORS: Registry = Registry("connector")
TAIL_TOLERANCE = 1e-4  # relative: a traced tail reproduces the teacher's logits up to float reordering


def stone_weights(stones: Sequence[int], num_stages: int) -> list[float]:
    """w_i = 1/2^(n−i): the deepest stone weighs most (docs/method.md §6)."""
    return [0.5 ** (num_stages - i) for i in stones]


class _StageTracer(fx.Tracer):
    """Traces through the model but keeps its stage-end modules (and timm's no-trace modules) as single calls."""

    def __init__(self, stages: set[str]) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.stages, self._whole = stages, tuple(get_notrace_modules())

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return qualname in self.stages or isinstance(module, self._whole) or super().is_leaf_module(module, qualname)


def teacher_tails(teacher: nn.Module, stages: list[str], name: str) -> list[fx.GraphModule]:
    """The teacher's computation from each stage-end module's output to its logits, as graph modules taking that
    output (see the module docstring for when a tail is valid)."""
    # Optional forward arguments (timm ViTs' attn_mask, is_causal) keep their defaults: the image is the only input.
    params = list(inspect.signature(teacher.forward).parameters.values())[1:]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        graph = _StageTracer(set(stages)).trace(teacher, concrete_args=defaults)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError... on dynamic control flow
        raise UserError(
            f"block-kd: teacher {name} cannot be traced by torch.fx ({first_line(err)}), so it cannot be run from a "
            "stage; use a traceable teacher"
        ) from err
    return [_cut(teacher, graph, stage, name) for stage in stages]


def _cut(teacher: nn.Module, graph: fx.Graph, stage: str, name: str) -> fx.GraphModule:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == stage]
    if len(calls) != 1:
        raise UserError(
            f"block-kd: teacher {name}'s stage end {stage} runs {len(calls)} times in its forward pass, not once; "
            "name other stage taps with --teacher-layers"
        )
    start, output = calls[0], next(n for n in graph.nodes if n.op == "output")
    needed, pending = set(), [output]
    while pending:
        node = pending.pop()
        if node not in needed:
            needed.add(node)
            pending.extend(node.all_input_nodes if node is not start else ())
    # Anything needed that the image feeds, other than through the stage's output, comes from before the stage.
    from_image = set()
    for node in graph.nodes:
        if node is not start and (node.op == "placeholder" or any(a in from_image for a in node.all_input_nodes)):
            from_image.add(node)
    downstream = {n for n in needed if n not in from_image}
    skips = [a for n in graph.nodes if n in downstream for a in n.all_input_nodes if a in from_image & needed]
    if skips:
        source = skips[0]
        raise UserError(
            f"block-kd: teacher {name}'s layers after {stage} also read {_describe(source)}, computed before "
            f"{stage}'s output (a skip over the stage end), so the teacher cannot be run from {stage}; name other "
            "stage taps with --teacher-layers"
        )
    tail = fx.Graph()
    values = {start: tail.placeholder("features")}
    for node in graph.nodes:  # in execution order, so every input is copied before its users
        if node in needed and node is not start:
            values[node] = tail.node_copy(node, lambda n: values[n])
    return fx.GraphModule(teacher, tail, class_name="TeacherTail")


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "the input image"
    return f"the output of {node.target}" if node.op == "call_module" else f"{node.name} ({node.op})"


# A connector's channel map: (in channels, out channels, on a 2-D map) -> module; tokens are mapped as a sequence.
ChannelMap = Callable[[int, int, bool], nn.Module]


@CONNECTORS.register(name="conv1x1_bn")
def conv1x1_bn(in_channels: int, out_channels: int, spatial: bool) -> nn.Module:
    """1×1 convolution + BatchNorm (kdpipe's default: "to align the channel numbers", docs/method.md §6)."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if spatial else (nn.Conv1d, nn.BatchNorm1d)
    return nn.Sequential(conv(in_channels, out_channels, 1, bias=False), norm(out_channels))


@CONNECTORS.register(name="conv1x1")
def conv1x1(in_channels: int, out_channels: int, spatial: bool) -> nn.Module:
    """A 1×1 convolution with bias, no normalisation."""
    return (nn.Conv2d if spatial else nn.Conv1d)(in_channels, out_channels, 1)


@CONNECTORS.register(name="conv3x3_bn")
def conv3x3_bn(in_channels: int, out_channels: int, spatial: bool) -> nn.Module:
    """3×3 convolution + BatchNorm (maps only: tokens have no neighbourhood to convolve)."""
    if not spatial:
        raise UserError("block-kd: connector conv3x3_bn needs a map on the teacher's side; use conv1x1_bn for tokens")
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))


class Connector(nn.Module):
    """C_i: a student stage output onto the teacher's stage-i shape and layout.

    The student's grid (a map, or tokens on their patch grid) is average-pooled to the teacher's when larger (a
    smaller grid is an error, as in docs/method.md §3), then its channels are mapped. Teacher maps (NCHW or NHWC) take a
    student map or patch grid (prefix tokens have no image region and are dropped); teacher tokens take student
    tokens with the same number of prefix tokens, or a map when the teacher has none, mapped token by token.
    """

    def __init__(self, student: Tap, teacher: Tap, kind: str) -> None:
        super().__init__()
        for tap, side in ((student, "student"), (teacher, "teacher")):
            if tap.spatial is None:
                raise UserError(
                    f"block-kd: {side} stage tap {tap.name} ({tap.describe()}) has no image grid; a connector joins "
                    "maps or tokens on a patch grid"
                )
        if any(s < t for s, t in zip(student.spatial, teacher.spatial, strict=True)):
            raise UserError(
                f"block-kd: student stage tap {student.name}'s grid {student.spatial} is smaller than teacher stage "
                f"tap {teacher.name}'s {teacher.spatial}; a connector only pools"
            )
        self.tokens = teacher.layout == "NLC"
        if self.tokens and student.prefix_tokens != teacher.prefix_tokens:
            raise UserError(
                f"block-kd: teacher stage tap {teacher.name} has {teacher.prefix_tokens} prefix tokens, student stage "
                f"tap {student.name} {student.prefix_tokens}; a connector cannot make or drop them"
            )
        self.student, self.teacher = student, teacher
        self.channel_map = CONNECTORS.get(kind)(student.channels, teacher.channels, not self.tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix, grid = grid_parts(x, self.student)
        if tuple(grid.shape[2:]) != tuple(self.teacher.spatial):
            grid = F.adaptive_avg_pool2d(grid, self.teacher.spatial)  # pooling first: it commutes with a 1×1 map
        if self.tokens:
            return self.channel_map(torch.cat([prefix, grid.flatten(2)], dim=2)).transpose(1, 2)
        mapped = self.channel_map(grid)
        return mapped.permute(0, 2, 3, 1) if self.teacher.layout == "NHWC" else mapped


class SteppingStones(nn.Module):
    """The stones i in `stones` (1-based stage numbers): trained connectors into the frozen teacher's tails.

    `forward(stage_outputs)` takes the student's stage outputs by tap name and returns the stones' logits, in order.
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_name: str,
        student_stages: list[Tap],
        teacher_stages: list[Tap],
        stones: Sequence[int],
        connector: str,
        input_size: int,
    ) -> None:
        super().__init__()
        self.stones = list(stones)
        self.student_taps = [student_stages[i - 1].name for i in self.stones]
        self.teacher_taps = [teacher_stages[i - 1].name for i in self.stones]
        self.weights = stone_weights(self.stones, len(teacher_stages))
        self.connectors = nn.ModuleList(
            Connector(student_stages[i - 1], teacher_stages[i - 1], connector) for i in self.stones
        )
        teacher.eval().requires_grad_(False)
        # Not submodules: the teacher stays out of parameters(), state_dict() and train(); `_apply` moves it.
        self._tails = teacher_tails(teacher, self.teacher_taps, teacher_name)
        self._check_tails(teacher, teacher_name, input_size)

    def _check_tails(self, teacher: nn.Module, name: str, input_size: int) -> None:
        """Each tail, fed the teacher's own stage output on a dry batch, must return the teacher's own logits."""
        device = next(teacher.parameters()).device
        forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with torch.no_grad(), forked, TapRecorder(teacher, self.teacher_taps) as recorder:
            torch.manual_seed(0)
            images = torch.randn(DRY_BATCH, 3, input_size, input_size, device=device)
            features = recorder.run(images)
            logits = recorder.logits
            for stage, tail in zip(self.teacher_taps, self._tails, strict=True):
                error = (tail(features[stage]) - logits).abs().max().item()
                if not error <= TAIL_TOLERANCE * (1 + logits.abs().max().item()):
                    raise UserError(
                        f"block-kd: teacher {name} run from {stage} does not reproduce its own logits (max difference "
                        f"{error:.3g}); its layers after {stage} depend on more than {stage}'s output"
                    )

    def describe(self) -> list[dict]:
        """Each stone as a run records it: its stage, the joined taps with their shapes, its weight."""
        return [
            {
                "stage": i,
                "student": c.student.name,
                "student_shape": list(c.student.shape),
                "teacher": c.teacher.name,
                "teacher_shape": list(c.teacher.shape),
                "weight": w,
            }
            for i, c, w in zip(self.stones, self.connectors, self.weights, strict=True)
        ]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for tail in self._tails:
            tail._apply(fn, recurse)
        return self

    def forward(self, stage_outputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [
            tail(connector(stage_outputs[tap]))
            for tap, connector, tail in zip(self.student_taps, self.connectors, self._tails, strict=True)
        ]
