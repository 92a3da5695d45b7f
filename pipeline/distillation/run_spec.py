"""A distill run's spec, typed: every setting that shapes its result, as the config and the method resolve them.

Distill writes it (`pipeline.stages.distill`), with each epoch checkpoint (a resumed run must match it), in the
student's weights header (`pipeline.models.spec.ModelSpec.run`) and in distill.json; probe reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..config import DistillConfig
from ..engine.precision import AMP_RECORD
from ..version import __version__


@dataclass(frozen=True)
class RunSpec:
    """Every setting that shapes a distill run's result, as the config and the method resolve them: stored with each
    epoch checkpoint (a resumed run must match it, every key but the version), in the student's header and in
    distill.json. Its JSON is flat, as it always was: the settings, the run's facts, what the built terms record."""

    settings: dict[str, Any]  # the config's run settings the method uses, then the precision (when not float32)
    losses: dict[str, dict[str, Any]]  # every term's weight and hyperparameters
    num_classes: int
    input_size: int
    dataset: str
    store: str  # absolute path or URL
    store_config_hash: str
    student_taps: list[str]
    teacher_taps: list[str]
    terms: dict[str, Any]  # what the built loss terms record (Block-KD's stones)
    augmentation: dict[str, Any] | None  # the views trained on, when not the plain images
    epochs: int
    steps: int
    num_labelled: int
    num_training_rows: int
    target_order: str
    kdpipe_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "kdpipe_version": self.kdpipe_version,
            **self.settings,
            "losses": self.losses,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "dataset": self.dataset,
            "store": self.store,
            "store_config_hash": self.store_config_hash,
            "student_taps": self.student_taps,
            "teacher_taps": self.teacher_taps,
            **self.terms,
            **({"augmentation": self.augmentation} if self.augmentation is not None else {}),
            "epochs": self.epochs,
            "steps": self.steps,
            "num_labelled": self.num_labelled,
            "num_training_rows": self.num_training_rows,
            "target_order": self.target_order,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunSpec:
        """A recorded run spec: the options a run records (and the precision) are its settings, whatever is neither
        a setting nor a fact of the run is a term's record. A fact an older run did not record reads as None."""
        settings = DistillConfig.spec_fields() | {AMP_RECORD}
        facts = {f.name for f in fields(cls)} - {"settings", "terms"}
        return cls(
            settings={k: v for k, v in record.items() if k in settings},
            terms={k: v for k, v in record.items() if k not in settings | facts},
            **{k: record.get(k) for k in facts - {"kdpipe_version"}},
            kdpipe_version=record.get("kdpipe_version", __version__),
        )
