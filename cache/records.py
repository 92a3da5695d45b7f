"""The store's records, typed: its identity (everything that determines its contents: teacher, weights, data,
preprocessing, taps, subset, precision, views), written by `kdpipe extract` and read by every later stage, and each
split's record (its size, blocks, arrays, fingerprint and scores).

The identity's JSON is the store root's `identity` attribute and, hashed, its `config_hash`: `to_json` writes
exactly the keys extract always wrote for a store of its kind (no `amp` at float32, no `augment` without views), so an
interrupted store resumes under the same hash. `from_json` is the one place older stores are read: keys added since
take the value they meant before they existed. The identity's version is the store's format version
(`cache.schema.FORMAT_VERSION`); a split's record is read from its group's attributes (`SplitStore.record`). Beside
the identity, not hashed, the store records its provenance (`StoreProvenance`): who wrote it, when, and where its
teacher's weights and data were found.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .schema import PICKED_BY


@dataclass(frozen=True)
class TeacherRecord:
    """The teacher as extract ran it: its model name and kwargs, the weights' sha256 (None: pretrained or random),
    the checkpoint entry the weights came from, whether the weights' head was "loaded" or "dropped" (another class
    count), and its stage-end taps (None in stores from before they were recorded: rebuilt from the model)."""

    name: str
    checkpoint_sha256: str | None = None
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_key: str | None = None
    head: str = "loaded"
    stage_ends: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TeacherRecord:
        return cls(
            record["name"],
            record.get("checkpoint_sha256"),
            record.get("pretrained", False),
            record.get("model_kwargs") or {},
            record.get("checkpoint_key"),
            record.get("head", "loaded"),
            record.get("stage_ends"),
        )


@dataclass(frozen=True)
class DatasetRecord:
    """The data the teacher saw: the dataset, its classes, the preprocessing (`Preprocessing.to_dict`) and, per
    extracted split, its fingerprint record and size."""

    name: str
    num_classes: int
    classes: list[str]
    preprocessing: dict[str, Any]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        return self.preprocessing["input_size"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> DatasetRecord:
        return cls(
            record["name"], record["num_classes"], record["classes"], record["preprocessing"], record.get("splits", {})
        )


@dataclass(frozen=True)
class StoreIdentity:
    """What a store holds: `taps` are `Tap.record()`s (name, shape, layout, ...), `logits` whether the teacher's
    logits are cached, `max_samples` and `subset_seed` the cached subset (None: every sample), `amp` the precision
    the teacher ran at, `augment` the policy, views and seed of augmented views (None: plain images only)."""

    teacher: TeacherRecord
    dataset: DatasetRecord
    taps: list[dict[str, Any]]
    feature_dtype: str
    logits: bool = True
    max_samples: int | None = None
    subset_seed: int | None = None
    amp: str = "off"
    augment: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        record = {
            "teacher": self.teacher.to_json(),
            "dataset": self.dataset.to_json(),
            "taps": self.taps,
            "feature_dtype": self.feature_dtype,
            "logits": self.logits,
            "max_samples": self.max_samples,
            "subset_seed": self.subset_seed,
        }
        if self.amp != "off":  # absent at float32, whose stores keep the identity they always had
            record["amp"] = self.amp
        if self.augment is not None:  # absent from a store of plain images
            record["augment"] = self.augment
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> StoreIdentity:
        return cls(
            TeacherRecord.from_json(record["teacher"]),
            DatasetRecord.from_json(record["dataset"]),
            record["taps"],
            record["feature_dtype"],
            record.get("logits", True),
            record.get("max_samples"),
            record.get("subset_seed"),
            record.get("amp", "off"),
            record.get("augment"),
        )

    @property
    def config_hash(self) -> str:
        """The hash a store records of its identity: equal hashes, equal contents."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @property
    def tap_names(self) -> list[str]:
        return [t["name"] for t in self.taps]


@dataclass(frozen=True)
class Picks:
    """The taps `kdpipe score` picked (`selected`, its top `top_k` by Q at `seed`) and every scored tap's Q
    (`quality`, JSON key `Q`; None where Q is undefined), as a scored split records them. Carried to a store that
    caches only them (its `picked_by` entry), they also say where they were read (`source`: the scores file), which
    store they scored (`scored_store_config_hash`) and on which teacher (`teacher`: its name, and its weights' sha256
    where recorded)."""

    selected: list[str]
    quality: dict[str, float | None]
    seed: int
    top_k: int
    source: str | None = None
    scored_store_config_hash: str | None = None
    teacher: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        record = {"selected": self.selected, "seed": self.seed, "top_k": self.top_k, "Q": self.quality}
        if self.source is not None:  # carried picks; a split's own record has none of these
            record.update(
                scores=self.source, scored_store_config_hash=self.scored_store_config_hash, teacher=self.teacher
            )
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Picks:
        return cls(
            list(record["selected"]),
            dict(record["Q"]),
            record["seed"],
            record["top_k"],
            record.get("scores"),
            record.get("scored_store_config_hash"),
            record.get("teacher"),
        )


@dataclass(frozen=True)
class SplitRecord:
    """A split's attributes: `num_samples` rows of `dataset_size` samples in blocks of `block_rows`, the `taps` and
    `arrays` it holds, its data `fingerprint` (and the scheme it was computed with; None in stores from before
    schemes were recorded), its number of `views`, whether it is `complete`, and its `scores` (what `kdpipe score`
    picked; None until scored)."""

    num_samples: int
    block_rows: int
    taps: list[str]
    arrays: list[str]
    dataset_size: int | None = None
    fingerprint: str | None = None
    fingerprint_scheme: str | None = None
    views: int = 1
    complete: bool = False
    scores: Picks | None = None

    @classmethod
    def from_json(cls, attrs: dict[str, Any]) -> SplitRecord:
        return cls(
            attrs["num_samples"],
            attrs["block_rows"],
            list(attrs.get("taps", [])),
            list(attrs["arrays"]),
            attrs.get("dataset_size"),
            attrs.get("fingerprint"),
            attrs.get("fingerprint_scheme"),
            attrs.get("views", 1),
            bool(attrs.get("complete", False)),
            Picks.from_json(attrs["scores"]) if attrs.get("scores") else None,
        )


@dataclass(frozen=True)
class StoreProvenance:
    """The store root's record beside its identity: the kdpipe that wrote it and when, the identity's hash, where
    the teacher's weights were read (`checkpoint_path` absolute, `checkpoint_relative` from the folder holding the
    store; None without a checkpoint, and `relative_recorded` False in stores from before the relative path was
    kept), the data root (None: the dataset's own), and the picks that chose its taps (two-pass extraction)."""

    kdpipe_version: str
    created: str
    config_hash: str
    checkpoint_path: str | None = None
    checkpoint_relative: str | None = None
    relative_recorded: bool = True
    data_root: str | None = None
    picked_by: Picks | None = None

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> StoreProvenance:
        picked = meta.get(PICKED_BY)
        return cls(
            meta.get("kdpipe_version", "unknown"),
            meta.get("created", "unknown"),
            meta["config_hash"],
            meta.get("checkpoint_path"),
            meta.get("checkpoint_relative"),
            "checkpoint_relative" in meta,
            meta.get("data_root"),
            Picks.from_json(picked) if picked else None,
        )
