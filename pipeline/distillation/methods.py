"""Distillation methods (docs/method.md §3, §6): each is a named, weighted sum of registered loss terms.

The contract (after mdistiller): `distiller(images, batch) -> (student_output, {"loss_name": weighted tensor})`;
the training loop sums the dict, logs each entry and trains `distiller.parameters()`: the student and whatever its
loss terms own (projectors, connectors, ...), all in one `ModuleDict`.
`batch` holds only the cached arrays the method's losses declare (`Distiller.inputs`), so a method without
a label loss is never even handed a label, and `ce` never reads anything the teacher produced.

A run may reweight or reconfigure a method's terms, or add terms, from its config:

    losses: {kd: {temperature: 2}}              # sets kd's temperature where the method has kd (ignored elsewhere)
    losses: {feature_mse: 0, feature_cosine: 1} # a weight sets the term, adding it if needed; 0 drops it
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from cache.schema import LABELS, LOGITS, feature_path

from ..errors import UserError
from ..models.taps import Tap, TapRecorder
from ..registry import Registry
from .losses import LOSSES, RUN_INPUTS, TEACHER_FEATURES, TEACHER_MODEL, StudentOutput, TermSetup, loss_defaults

METHODS: Registry = Registry("method")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Term:
    """One loss of a method with its weight and hyperparameters (the loss's defaults where not given)."""

    loss: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, setup: TermSetup) -> nn.Module:
        """The loss module with its hyperparameters, its run-dependent parts built from `setup`."""
        loss = LOSSES.get(self.loss)(**self.kwargs)
        loss.build(setup)
        return loss

    def settings(self) -> dict[str, Any]:
        """Weight and every hyperparameter, defaults filled in: what a run records and compares on resume."""
        return {"weight": self.weight, **loss_defaults(LOSSES.get(self.loss)), **self.kwargs}


@dataclass(frozen=True)
class Method:
    """What a method optimises: the weighted sum of its `terms`.

    `teacher_taps` says which teacher taps feature losses use: "picked" (top-k by Q from `kdpipe score`) or
    "standard" (the teacher's stage ends). A method whose losses read the student's logits (ce, kd) trains the
    student's own classifier and is evaluated with it; the others train the backbone only and are evaluated with the
    linear probe. A method with a label loss trains on the labelled rows only.
    """

    name: str
    summary: str
    terms: tuple[Term, ...]
    teacher_taps: str | None = None

    def configured(self, overrides: Mapping[str, Mapping[str, Any]]) -> Method:
        """The method with `overrides` applied ({loss: {weight?, **kwargs}}, see the module docstring)."""
        terms = {t.loss: t for t in self.terms}
        for loss, settings in overrides.items():
            settings = dict(settings)
            weight = settings.pop("weight", None)
            if loss not in terms and weight is None:
                log.debug("method %s has no %s term: its settings %s are not used", self.name, loss, settings)
                continue  # hyperparameters for methods that have this term
            current = terms.get(loss, Term(loss))
            terms[loss] = Term(loss, current.weight if weight is None else weight, {**current.kwargs, **settings})
        kept = tuple(t for t in terms.values() if t.weight != 0)
        if not kept:
            raise UserError(f"--losses leaves method {self.name!r} with no loss term")
        configured = replace(self, terms=kept)
        if configured.has_feature_loss and self.teacher_taps is None:
            raise UserError(
                f"method {self.name!r} pairs no teacher taps, so it cannot take a feature loss; use a feature method"
            )
        return configured

    @property
    def losses(self) -> tuple[str, ...]:
        return tuple(t.loss for t in self.terms)

    @property
    def inputs(self) -> set[str]:
        return {i for loss in self.losses for i in LOSSES.get(loss).inputs}

    @property
    def has_feature_loss(self) -> bool:
        return TEACHER_FEATURES in self.inputs

    @property
    def reads_teacher(self) -> bool:
        """Whether the method reads anything the teacher outputs (features, logits), which `--online-teacher`
        computes instead of reading the cache."""
        return self.has_feature_loss or LOGITS in self.inputs

    @property
    def uses_labels(self) -> bool:
        return LABELS in self.inputs

    @property
    def needs_logits(self) -> bool:
        """Whether the student runs to its logits; feature-only students stop after their last tap."""
        return any(LOSSES.get(loss).student_logits for loss in self.losses)

    @property
    def runs_teacher(self) -> bool:
        """Whether a term runs the store's frozen teacher (Block-KD's stones through its tail)."""
        return TEACHER_MODEL in self.inputs

    @property
    def evaluated_with(self) -> str:
        """How a run of the method is evaluated: its own classifier when its losses trained one."""
        return "own classifier" if self.needs_logits else "linear probe"

    def ignored_settings(self) -> set[str]:
        """Distill settings that cannot change this method's result; a run spec leaves them out."""
        ignored = set() if self.reads_teacher else {"online_teacher"}
        return ignored | ({"unlabelled_distill"} if self.uses_labels else set())

    def spec(self) -> dict[str, dict[str, Any]]:
        return {t.loss: t.settings() for t in self.terms}


def format_terms(terms: Mapping[str, Mapping[str, Any]]) -> str:
    """`ce + 0.5·kd` from {loss: {weight, ...}} (a method's spec, or a run's recorded losses)."""
    return " + ".join(loss if t["weight"] == 1 else f"{t['weight']:g}·{loss}" for loss, t in terms.items())


def get_method(name: str) -> Method:
    return METHODS.get(name)


def register_method(method: Method) -> Method:
    return METHODS.register(method, name=method.name)


def cached_inputs(method: Method, teacher_targets: list[str]) -> list[str]:
    """The cached arrays (store paths) `method` reads with these teacher targets, in a fixed order."""
    names = []
    for loss in method.losses:
        for name in LOSSES.get(loss).inputs:
            if name not in RUN_INPUTS:
                names.extend(teacher_targets if name == TEACHER_FEATURES else [name])
    return list(dict.fromkeys(names))


def teacher_targets(teacher_taps: list[Tap]) -> list[str]:
    """The store paths of the teacher taps' cached features."""
    return [feature_path(t.name) for t in teacher_taps]


class Distiller(nn.Module):
    """A student and the weighted loss terms of one method, each term an `nn.Module` in `losses` (so whatever a
    term owns trains, saves and resumes with the student).

    `setup` hands the terms what the run knows: the paired taps (feature losses build their projectors on them) and
    the frozen teacher (for a term that runs it). Feature-only methods stop the forward pass after the last student
    tap: later layers get no gradient and are left untouched (the probe replaces them). Methods with a label or
    logit loss run the whole student.
    """

    def __init__(self, student: nn.Module, method: Method, setup: TermSetup) -> None:
        super().__init__()
        if method.has_feature_loss != bool(setup.teacher_taps):
            raise ValueError("teacher taps are given exactly to the methods with a feature loss")
        if method.runs_teacher != (setup.teacher is not None):
            raise ValueError("the frozen teacher is given exactly to the methods with a term that runs it")
        self.student, self.method = student, method
        self.teacher_targets = teacher_targets(setup.teacher_taps)
        self.weights = {t.loss: t.weight for t in method.terms}
        self.losses = nn.ModuleDict({t.loss: t.build(setup) for t in method.terms})
        recorded = list(dict.fromkeys(tap for loss in self.losses.values() for tap in loss.student_taps))
        self._recorder = TapRecorder(student, recorded, stop_after_last=not method.needs_logits).attach()
        self.register_load_state_dict_pre_hook(_migrate_loss_parts)

    @property
    def inputs(self) -> list[str]:
        """The cached arrays (store paths) this method reads, in a fixed order."""
        return cached_inputs(self.method, self.teacher_targets)

    def record(self) -> dict[str, Any]:
        """What the run's spec keeps of the built terms (Block-KD's stones)."""
        return {k: v for loss in self.losses.values() for k, v in loss.record().items()}

    def forward(self, images: torch.Tensor, batch: dict[str, torch.Tensor]):
        features = self._recorder.run(images)  # no taps: just the logits
        output = StudentOutput(features, self._recorder.logits)
        losses = {}
        for name, loss in self.losses.items():
            value = loss(output, batch)
            parts = value.items() if isinstance(value, dict) else [(None, value)]
            losses.update({name if part is None else f"{name}.{part}": self.weights[name] * v for part, v in parts})
        return output, losses


# Where epoch checkpoints kept the terms' parts before the terms owned them: the distiller's own `pairs.<i>.` (the
# feature projectors) and `stones.` (Block-KD's), by the input that marks their owner now.
_MOVED_PARTS = {"pairs.": TEACHER_FEATURES, "stones.": TEACHER_MODEL}


def _migrate_loss_parts(module: Distiller, state: dict, prefix: str, *_) -> None:
    """Renames an older epoch checkpoint's loss parts to the term that owns them now, so its run resumes."""
    for old, owner_input in _MOVED_PARTS.items():
        keys = [k for k in state if k.startswith(prefix + old)]
        owners = [n for n, loss in module.losses.items() if owner_input in loss.inputs]
        if keys and len(owners) == 1:
            log.warning("an older checkpoint: its %s* weights now belong to the %s term", old, owners[0])
            for key in keys:
                state[f"{prefix}losses.{owners[0]}.{key[len(prefix) :]}"] = state.pop(key)


register_method(
    Method(
        "feature",
        "Feature-only distillation on the teacher taps picked by Q; no label, no logit (the paper's method).",
        (Term("feature_mse"),),
        teacher_taps="picked",
    )
)
register_method(
    Method(
        "feature-standard",
        "Feature-only distillation on the teacher's stage-end taps (isolates the effect of the layer choice).",
        (Term("feature_mse"),),
        teacher_taps="standard",
    )
)
register_method(Method("ce", "The student alone, end to end with cross entropy (no teacher).", (Term("ce"),)))
register_method(
    Method("kd", "Vanilla KD: cross entropy plus T²·KL to the teacher's cached logits.", (Term("ce"), Term("kd")))
)
register_method(
    Method(
        "fitnet",
        'FitNet-style "Base FKD-KL": cross entropy plus feature MSE on the stage-end taps, all reaching the backbone.',
        (Term("ce"), Term("feature_mse")),
        teacher_taps="standard",
    )
)
register_method(
    Method(
        "fitnet-kd",
        '"Base FKD": cross entropy, T²·KL to the cached logits and feature MSE on the stage-end taps.',
        (Term("ce"), Term("kd"), Term("feature_mse")),
        teacher_taps="standard",
    )
)
register_method(
    Method(
        "block-kd",
        "Block-KD (Yu et al. 2024): CE and KD on the student and on stepping stones through the frozen teacher's tail.",
        (Term("block_kd"),),
    )
)
