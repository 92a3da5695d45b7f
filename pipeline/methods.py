"""Distillation methods (METHOD.md §3, §6): each is one registered declaration of which losses it sums.

The contract (after mdistiller): `distiller(images, batch) -> (student_output, {"loss_name": tensor})`; the
training loop sums the dict, logs each entry and trains `distiller.parameters()` (student plus projectors).
`batch` holds only the cached arrays the method's losses declare (`Distiller.inputs`), so a method without
a label loss is never even handed a label, and `ce` never reads anything the teacher produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .registry import Registry
from .taps import Tap, TapRecorder

LOSSES: Registry = Registry("loss")
METHODS: Registry = Registry("method")
register_method = METHODS.register
TEACHER_FEATURES = "teacher features"  # a loss input meaning "the cached features of the paired teacher taps"


def register_loss(*inputs: str, student_logits: bool = True):
    """Registers `loss(distiller, output, batch) -> tensor`, reading the cached arrays `inputs` from `batch`;
    a loss without `student_logits` lets the student's forward pass stop after its last tap."""

    def mark(fn):
        fn.inputs, fn.student_logits = inputs, student_logits
        return LOSSES.register(fn)

    return mark


@dataclass(frozen=True)
class Method:
    """What a method optimises: the sum of `losses` (weight 1 each; KD's T² lives inside its loss).

    `teacher_taps` says which teacher taps feature losses use: "picked" (top-k by Q from `kdpipe score`) or
    "standard" (the teacher's stage ends). A method with a label loss trains the student's own classifier and
    is evaluated with it; the others train the backbone only and are evaluated with the linear probe.
    """

    losses: tuple[str, ...]
    teacher_taps: str | None = None

    @property
    def inputs(self) -> set[str]:
        return {i for loss in self.losses for i in LOSSES.get(loss).inputs}

    @property
    def uses_labels(self) -> bool:
        return "labels" in self.inputs

    @property
    def needs_logits(self) -> bool:
        """Whether the student runs to its logits; feature-only students stop after their last tap."""
        return any(LOSSES.get(loss).student_logits for loss in self.losses)


def get_method(name: str) -> Method:
    return METHODS.get(name)()


def _as_map_or_tokens(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Vectors are 1×1 maps, so a pooled teacher vector meets a student map through the map rule."""
    return (shape[0], 1, 1) if len(shape) == 1 else tuple(shape)


class FeaturePair(nn.Module):
    """Aligns one student tap with one cached teacher tap and projects student channels to teacher channels.

    Conv maps (C, H, W): whichever map is larger in both axes is adaptive-average-pooled to the other's size (a map
    larger in one axis and smaller in the other is an error); the projector is a bias-free 1×1 Conv2d. When either
    side is a transformer's tokens (T, D), both become (B, channels, tokens), conv maps as (C, H·W), the token axis
    is pooled by the same rule, and the projector is a bias-free Conv1d of kernel 1 (a per-token linear map).
    """

    def __init__(self, student: Tap, teacher: Tap) -> None:
        super().__init__()
        s_shape, t_shape = _as_map_or_tokens(student.shape), _as_map_or_tokens(teacher.shape)
        self.tokens = len(s_shape) == 2 or len(t_shape) == 2
        s_channels, s_extent = self._channels_and_extent(s_shape)
        t_channels, t_extent = self._channels_and_extent(t_shape)
        if s_extent == t_extent:
            self.student_size = self.teacher_size = None
        elif all(s <= t for s, t in zip(s_extent, t_extent)):
            self.student_size, self.teacher_size = None, s_extent
        elif all(s >= t for s, t in zip(s_extent, t_extent)):
            self.student_size, self.teacher_size = t_extent, None
        else:
            raise UserError(
                f"student tap {student.name} {student.shape} and teacher tap {teacher.name} {teacher.shape}: "
                "one map is larger in one axis and smaller in the other; pick taps of compatible sizes"
            )
        conv = nn.Conv1d if self.tokens else nn.Conv2d
        self.projector = conv(s_channels, t_channels, 1, bias=False)

    def _channels_and_extent(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        if not self.tokens:
            return shape[0], tuple(shape[1:])
        if len(shape) == 2:  # tokens (T, D): D channels over T tokens
            return shape[1], (shape[0],)
        return shape[0], (shape[1] * shape[2],)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) maps, or (B, channels, tokens) when tokens are involved; vectors as 1×1 maps."""
        if x.dim() == 2:
            x = x[:, :, None, None]
        if not self.tokens:
            return x
        return x.transpose(1, 2) if x.dim() == 3 else x.flatten(2)

    def _pool(self, x: torch.Tensor, size: tuple[int, ...] | None) -> torch.Tensor:
        if size is None or tuple(x.shape[2:]) == tuple(size):
            return x
        return F.adaptive_avg_pool1d(x, size) if self.tokens else F.adaptive_avg_pool2d(x, size)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Element-wise MSE between projected student features and (pooled) teacher targets."""
        projected = self.projector(self._pool(self._layout(student), self.student_size))
        target = self._pool(self._layout(teacher.float()), self.teacher_size)
        return F.mse_loss(projected, target)


class Distiller(nn.Module):
    """A student, the `FeaturePair`s of its feature loss (if any) and the losses of one method.

    Feature-only methods stop the forward pass after the last student tap: later layers get no gradient and
    are left untouched (the probe replaces them). Methods with a label or logit loss run the whole student.
    """

    def __init__(
        self,
        student: nn.Module,
        method: Method,
        student_taps: list[Tap],
        teacher_taps: list[Tap],
        temperature: float = 4.0,
    ) -> None:
        super().__init__()
        if len(student_taps) != len(teacher_taps):
            raise UserError(
                f"{len(student_taps)} student taps for {len(teacher_taps)} teacher taps; they pair one-to-one"
            )
        if (method.teacher_taps is not None) != bool(teacher_taps):
            raise ValueError("teacher taps are given exactly to the methods with a feature loss")
        self.student, self.method, self.temperature = student, method, temperature
        self.pairs = nn.ModuleList(FeaturePair(s, t) for s, t in zip(student_taps, teacher_taps))
        self.student_taps = [t.name for t in student_taps]
        self.teacher_targets = [f"features/{t.name}" for t in teacher_taps]
        self._recorder = TapRecorder(student, self.student_taps, stop_after_last=not method.needs_logits).attach()

    @property
    def inputs(self) -> list[str]:
        """The cached arrays (store paths) this method reads, in a fixed order."""
        names = []
        for loss in self.method.losses:
            for name in LOSSES.get(loss).inputs:
                names.extend(self.teacher_targets if name == TEACHER_FEATURES else [name])
        return list(dict.fromkeys(names))

    def forward(self, images: torch.Tensor, batch: dict[str, torch.Tensor]):
        output = StudentOutput(self._recorder.run(images), self._recorder.logits)  # no taps: just the logits
        return output, {name: LOSSES.get(name)(self, output, batch) for name in self.method.losses}


@dataclass
class StudentOutput:
    features: dict[str, torch.Tensor]  # the student's distilled taps
    logits: torch.Tensor | None  # None when the forward pass stopped after the last tap


@register_loss(TEACHER_FEATURES, student_logits=False)
def feature_mse(distiller: Distiller, output: StudentOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_feat = mean over tap pairs of MSE(P(s), t), raw features (METHOD.md §3)."""
    pairs = zip(distiller.pairs, distiller.student_taps, distiller.teacher_targets)
    return torch.stack([pair(output.features[s], batch[t]) for pair, s, t in pairs]).mean()


@register_loss("labels")
def ce(distiller: Distiller, output: StudentOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross entropy of the student's logits to the labels."""
    return F.cross_entropy(output.logits, batch["labels"])


@register_loss("logits")
def kd(distiller: Distiller, output: StudentOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """T²·KL(p_t ‖ p_s) with p = softmax(z / T): summed over classes, averaged over the batch (METHOD.md §6)."""
    t = distiller.temperature
    log_student = F.log_softmax(output.logits / t, dim=1)
    teacher = F.softmax(batch["logits"].float() / t, dim=1)
    return t * t * F.kl_div(log_student, teacher, reduction="batchmean")


@register_method
def feature() -> Method:
    """Feature-only distillation on the teacher taps picked by Q; no label, no logit (the paper's method)."""
    return Method(("feature_mse",), teacher_taps="picked")


@register_method(name="feature-standard")
def feature_standard() -> Method:
    """Feature-only distillation on the teacher's stage-end taps (isolates the effect of the layer choice)."""
    return Method(("feature_mse",), teacher_taps="standard")


@register_method(name="ce")
def ce_only() -> Method:
    """The student alone, end to end with cross entropy (no teacher)."""
    return Method(("ce",))


@register_method(name="kd")
def vanilla_kd() -> Method:
    """Vanilla KD: cross entropy plus T²·KL to the teacher's cached logits."""
    return Method(("ce", "kd"))


@register_method
def fitnet() -> Method:
    """FitNet-style "Base FKD-KL": cross entropy plus feature MSE on the stage-end taps, all reaching the backbone."""
    return Method(("ce", "feature_mse"), teacher_taps="standard")


@register_method(name="fitnet-kd")
def fitnet_kd() -> Method:
    """ "Base FKD": cross entropy, T²·KL to the cached logits and feature MSE on the stage-end taps."""
    return Method(("ce", "kd", "feature_mse"), teacher_taps="standard")
