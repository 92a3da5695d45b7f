"""What a kdpipe weights file says of its model: the typed header that teach, distill and probe write
(`pipeline.engine.checkpoints.save_checkpoint`) and that every later reader rebuilds the model from.

The JSON stays flat, as it always was: the model's own fields, a distilled student's whole run spec beside them (its
settings, taps, store, budget: `run`), and a probe classifier's head. `from_json` is the one place older headers are
read: a student distilled before its preprocessing was recorded has none (the dataset's own applies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HEAD_FIELDS = ("tap", "tap_layout", "embedding_dim", "classes")
OWN_FIELDS = ("model", "preprocessing", "data_root", *HEAD_FIELDS)  # a student's header: these, and its run spec
RUN_MARK = "losses"  # a key only a run spec has
# (key, accepted types, required) of every field a reader builds a model or a classifier from
FIELD_TYPES = (
    ("model", (str,), True),
    ("num_classes", (int,), True),
    ("input_size", (int,), False),
    ("model_kwargs", (dict,), False),
    ("dataset", (str,), False),
    ("preprocessing", (dict,), False),
    ("data_root", (str,), False),
    ("tap", (str,), False),
    ("tap_layout", (str,), False),
    ("embedding_dim", (int,), False),
    ("classes", (list,), False),
)


@dataclass(frozen=True)
class ProbeHead:
    """A linear probe's head on the backbone: the tap it reads (by name and layout), its width and the class names."""

    tap: str
    tap_layout: str
    embedding_dim: int
    classes: list[str]


@dataclass(frozen=True)
class ModelSpec:
    """A model as its weights file records it: the architecture (`model`, `num_classes`, `input_size`, the
    `model_kwargs` it was built with), the `dataset` and `preprocessing` it was trained on, and for a distilled
    student where its data was found (`data_root`) and its run spec (`run`, the JSON of
    `pipeline.distillation.run_spec.RunSpec`); a classifier adds its probe `head`."""

    model: str
    num_classes: int
    input_size: int | None = None  # None in headers written by hand (tests, other tools): the model's default
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    preprocessing: dict[str, Any] | None = None
    data_root: str | None = None
    run: dict[str, Any] | None = None
    head: ProbeHead | None = None

    def to_json(self) -> dict[str, Any]:
        record = {
            **(self.run or {}),
            "model": self.model,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "model_kwargs": self.model_kwargs,
            "dataset": self.dataset,
        }
        if self.preprocessing is not None:
            record["preprocessing"] = self.preprocessing
        if self.run is not None:  # a student: where probe finds its data by default (null: the dataset's own)
            record["data_root"] = self.data_root
        if self.head is not None:
            record.update(vars(self.head))
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ModelSpec:
        """The spec a header holds; ValueError naming the first field that is missing or of the wrong type."""
        if not isinstance(record, dict):
            raise ValueError(f"a JSON object is expected, not {type(record).__name__}")
        for key, types, required in FIELD_TYPES:
            if key in record and record[key] is not None and not isinstance(record[key], types):
                raise ValueError(f"{key} is {type(record[key]).__name__}, not {' or '.join(t.__name__ for t in types)}")
            if required and record.get(key) is None:
                raise ValueError(f"{key} is missing")
        head = ProbeHead(*(record[k] for k in HEAD_FIELDS)) if "tap" in record else None
        return cls(
            record["model"],
            record["num_classes"],
            record.get("input_size"),
            record.get("model_kwargs") or {},
            record.get("dataset"),
            record.get("preprocessing"),
            record.get("data_root"),
            {k: v for k, v in record.items() if k not in OWN_FIELDS} if RUN_MARK in record else None,
            head,
        )
