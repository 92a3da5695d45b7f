"""Loss terms (docs/method.md §3, §6): registered modules that own their hyperparameters, their trainable parts and
declare what they read.

A loss is `loss(output, batch) -> tensor`. `inputs` names what it reads: cached arrays from `batch` (store paths
such as `labels` and `logits`, or `TEACHER_FEATURES` for the paired teacher taps), the batch's store rows
(`STORE_ROWS`, for per-sample state such as a memory bank), or the store's frozen teacher (`TEACHER_MODEL`, to run
its layers, as Block-KD's stones do); a method's batch holds nothing else. A loss without `student_logits` lets the
student's forward pass stop after its last tap. Constructor arguments are the loss's hyperparameters, settable per
term from YAML (`losses: {kd: {weight: 1.0, temperature: 4}}`).

Each term is an `nn.Module` in the distiller's `ModuleDict`, so whatever it owns (projectors, connectors,
embeddings, memory banks, running statistics) is trained, checkpointed, resumed and wrapped by DDP like the student.
Parts that depend on the run (the taps' shapes, the teacher) are made in `build(setup)`, called once before training.

Feature criteria subclass `FeatureLoss`, which owns one `pipeline.distillation.alignment.FeatureAlignment` (projector
and pooling) per tap pair, so a new one is a `criterion` method on one registered class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cache.schema import LABELS, LOGITS, feature_path

from ..errors import UserError
from ..models.taps import Tap
from ..registry import Registry, UnknownName
from .alignment import FeatureAlignment
from .stones import CONNECTORS, SteppingStones

LOSSES: Registry = Registry("loss")
TEACHER_FEATURES = "teacher features"  # a loss input meaning "the cached features of the paired teacher taps"
STORE_ROWS = "store rows"  # a loss input: the batch's rows in the store (int64), one per image
TEACHER_MODEL = "teacher model"  # a loss input: the store's teacher, frozen, handed to `build`
RUN_INPUTS = (STORE_ROWS, TEACHER_MODEL)  # inputs that are not cached arrays


@dataclass(frozen=True)
class FrozenTeacher:
    """The store's teacher for a loss that runs it (`TEACHER_MODEL`): eval mode, never trained or saved, with the
    stage ends (docs/method.md §6) of both models, paired by stage."""

    name: str
    model: nn.Module
    student_stages: list[Tap]
    teacher_stages: list[Tap]
    input_size: int


@dataclass(frozen=True)
class TermSetup:
    """What a term builds its trainable parts from: the paired taps of feature losses (one student tap per teacher
    tap) and the frozen teacher (present when a term reads `TEACHER_MODEL`)."""

    student_taps: list[Tap] = field(default_factory=list)
    teacher_taps: list[Tap] = field(default_factory=list)
    teacher: FrozenTeacher | None = None


@dataclass
class StudentOutput:
    """What the student produced for one batch, as the losses see it."""

    features: dict[str, torch.Tensor]  # the student's recorded taps: every tap some term reads
    logits: torch.Tensor | None  # None when the forward pass stopped after the last tap


class Loss(nn.Module):
    """Base of the loss terms: `forward(output, batch)` returns a scalar, or named parts ({part: scalar}) that the
    distiller logs as `loss.part`.

    `build(setup)` makes the parts that depend on the run; `student_taps` lists the student taps the term reads from
    `output.features`; `record()` is what a run's spec keeps of the built term beyond its settings.
    """

    inputs: ClassVar[tuple[str, ...]] = ()
    student_logits: ClassVar[bool] = True

    def build(self, setup: TermSetup) -> None:
        """Makes the term's run-dependent parts; nothing to make by default."""

    @property
    def student_taps(self) -> list[str]:
        return []

    def record(self) -> dict[str, Any]:
        return {}

    def forward(self, output: StudentOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        raise NotImplementedError


def loss_parameters(loss: type[Loss]) -> dict[str, inspect.Parameter]:
    """The loss's hyperparameters: its constructor's named arguments, each with a default."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(loss.__init__, eval_str=True).parameters.items()
    return {n: p for n, p in params if n != "self" and p.kind in named and p.default is not inspect.Parameter.empty}


def loss_defaults(loss: type[Loss]) -> dict[str, Any]:
    """The loss's hyperparameters with their default values."""
    return {n: p.default for n, p in loss_parameters(loss).items()}


def _positive(loss: str, name: str, value: float) -> float:
    if not value > 0:
        raise UserError(f"loss {loss!r}: {name} must be > 0, not {value}")
    return value


@LOSSES.register(name="ce")
class CrossEntropy(Loss):
    """Cross entropy of the student's logits to the labels."""

    inputs = (LABELS,)

    def forward(self, output: StudentOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(output.logits, batch[LABELS])


@LOSSES.register(name="kd")
class KLDivergence(Loss):
    """T²·KL(p_t ‖ p_s) with p = softmax(z / T): summed over classes, averaged over the batch (docs/method.md §6)."""

    inputs = (LOGITS,)

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = _positive("kd", "temperature", temperature)

    def forward(self, output: StudentOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return kd_loss(output.logits, batch[LOGITS], self.temperature)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher / T) ‖ softmax(student / T)), summed over classes and averaged over the batch."""
    log_student = F.log_softmax(student / temperature, dim=1)
    target = F.softmax(teacher.float() / temperature, dim=1)
    return temperature * temperature * F.kl_div(log_student, target, reduction="batchmean")


@LOSSES.register(name="block_kd")
class BlockKD(Loss):
    """Block-KD: α·L_task + β·L_distill + γ·L_cross over the student and its stepping stones (docs/method.md §6).

    With stone weights w_i = 1/2^(n−i): L_task = CE(y_S) + Σ w_i CE(y_Ni); L_distill = KD(y_S, y_T) + Σ w_i KD(y_Ni,
    y_T), KD as in `kd` at `temperature`; L_cross = KD(y_S, y_ens) + Σ KD(y_Ni, y_ens) with y_ens the stones' mean
    logits, detached. `connector` (`pipeline.distillation.stones.CONNECTORS`) and `stones` (stage numbers 1..n; None:
    all n) shape the stones, which the term owns: their connectors train with the student, into the frozen teacher's
    tails.
    A part with weight 0 is not computed.
    """

    inputs = (LABELS, LOGITS, TEACHER_MODEL)

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.0,
        temperature: float = 4.0,
        connector: str = "conv1x1_bn",
        stones: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not value >= 0:
                raise UserError(f"loss 'block_kd': {name} must be >= 0, not {value}")
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.temperature = _positive("block_kd", "temperature", temperature)
        try:
            CONNECTORS.get(connector)
        except UnknownName as err:
            raise UserError(f"loss 'block_kd': {err}") from None
        if stones is not None:
            stones = tuple(stones)
            if not (stones and all(i >= 1 for i in stones) and len(set(stones)) == len(stones)):
                raise UserError(f"loss 'block_kd': stones must be distinct stage numbers from 1, not {list(stones)}")
        self.connector, self.stages = connector, stones
        self.stones: SteppingStones | None = None

    def build(self, setup: TermSetup) -> None:
        """The stepping stones at the chosen stages of the frozen teacher (docs/method.md §6)."""
        teacher = setup.teacher
        n = len(teacher.teacher_stages)
        stages = list(range(1, n + 1)) if self.stages is None else sorted(self.stages)
        if stages[-1] > n:
            raise UserError(f"--losses block_kd.stones: there is no stage {stages[-1]}; the stages are 1..{n}")
        self.stones = SteppingStones(
            teacher.model,
            teacher.name,
            teacher.student_stages,
            teacher.teacher_stages,
            stages,
            self.connector,
            teacher.input_size,
        )

    @property
    def student_taps(self) -> list[str]:
        return self.stones.student_taps

    def record(self) -> dict[str, Any]:
        return {"stones": self.stones.describe()}

    def forward(self, output: StudentOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.parts(output.logits, self.stones(output.features), self.stones.weights, batch)

    def parts(
        self, student: torch.Tensor, stones: list[torch.Tensor], weights: list[float], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The weighted parts from the student's logits and the stones' logits, with stone weights w_i."""
        t = self.temperature
        parts = {}
        if self.alpha:
            labels = batch[LABELS]
            ce = [F.cross_entropy(y, labels) for y in stones]
            parts["task"] = self.alpha * (F.cross_entropy(student, labels) + _weighted(weights, ce))
        if self.beta:
            teacher = batch[LOGITS]
            kd = [kd_loss(y, teacher, t) for y in stones]
            parts["distill"] = self.beta * (kd_loss(student, teacher, t) + _weighted(weights, kd))
        if self.gamma:
            ensemble = torch.stack(stones).mean(0).detach()
            cross = [kd_loss(y, ensemble, t) for y in [student, *stones]]
            parts["cross"] = self.gamma * torch.stack(cross).sum()
        return parts


def _weighted(weights: list[float], losses: list[torch.Tensor]) -> torch.Tensor | float:
    return sum((w * loss for w, loss in zip(weights, losses, strict=True)), 0.0)


class FeatureLoss(Loss):
    """Base of feature criteria: the mean over tap pairs of `criterion(projected student, teacher target)`.

    Both tensors are (B, channels, H, W) or (B, channels, tokens), aligned by the term's own `FeatureAlignment` of
    each pair (its projector trains with the student; two feature terms of one method project separately).
    """

    inputs = (TEACHER_FEATURES,)
    student_logits = False

    def build(self, setup: TermSetup) -> None:
        if len(setup.student_taps) != len(setup.teacher_taps):
            raise UserError(
                f"{len(setup.student_taps)} student taps for {len(setup.teacher_taps)} teacher taps; they pair "
                "one-to-one"
            )
        pairs = list(zip(setup.student_taps, setup.teacher_taps, strict=True))
        self.pairs = nn.ModuleList(FeatureAlignment(s, t) for s, t in pairs)
        self.paths = [(s.name, feature_path(t.name)) for s, t in pairs]  # (student tap, teacher target's store path)

    @property
    def student_taps(self) -> list[str]:
        return [tap for tap, _ in self.paths]

    def forward(self, output: StudentOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(
            [
                self.criterion(*pair(output.features[tap], batch[path]))
                for pair, (tap, path) in zip(self.pairs, self.paths, strict=True)
            ]
        ).mean()

    def criterion(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@LOSSES.register(name="feature_mse")
class FeatureMSE(FeatureLoss):
    """L_feat: element-wise MSE between projected student features and the raw teacher features (docs/method.md §3)."""

    def criterion(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher)


@LOSSES.register(name="feature_cosine")
class FeatureCosine(FeatureLoss):
    """1 − cosine similarity of projected student and teacher features: along channels at each position, or of the
    whole flattened feature per sample (`per: sample`); blind to feature scale, unlike the MSE."""

    def __init__(self, per: str = "position", eps: float = 1e-8) -> None:
        super().__init__()
        if per not in ("position", "sample"):
            raise UserError(f"loss 'feature_cosine': per must be position or sample, not {per!r}")
        self.per, self.eps = per, _positive("feature_cosine", "eps", eps)

    def criterion(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.per == "sample":
            student, teacher = student.flatten(1), teacher.flatten(1)
        return (1 - F.cosine_similarity(student, teacher, dim=1, eps=self.eps)).mean()


def describe(name: str) -> dict[str, Any]:
    """A loss's summary, inputs and hyperparameters with their defaults, for `kdpipe methods`."""
    loss = LOSSES.get(name)
    return {
        "name": name,
        "summary": LOSSES.summary(name),
        "inputs": loss.inputs,
        "parameters": loss_defaults(loss),
    }
