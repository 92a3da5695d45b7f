"""The store's typed records: what extract writes reads back as the same JSON and hash, every split's record reads,
and an identity from before a field existed reads with the value it meant then."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cache import schema
from cache.records import SplitRecord, StoreIdentity, TeacherRecord
from cache.schema import ATTR_KEY, STORE_NAME
from cache.store import FeatureStore


def test_an_extracted_identity_round_trips_to_its_json_and_hash(scored_store):
    store = FeatureStore.open(scored_store)
    recorded = store.meta["identity"]
    assert store.identity.to_json() == recorded
    assert store.identity.config_hash == store.meta["config_hash"]
    assert StoreIdentity.from_json(json.loads(json.dumps(recorded))) == store.identity
    assert store.identity.tap_names == ["layer2.2", "layer3.2"]


def test_every_split_record_reads(scored_store):
    store = FeatureStore.open(scored_store)
    for part in store.splits():
        record = part.record
        assert isinstance(record, SplitRecord)
        assert record.num_samples == part.num_samples and record.complete
        assert record.dataset_size == store.identity.dataset.splits[part.name]["size"]
        assert set(record.arrays) == {"features/layer2.2", "features/layer3.2", "labels", "indices", "logits"}
    assert store.split("train").record.scores.selected == ["layer2.2", "layer3.2"]


def test_an_older_identity_reads_with_what_its_missing_fields_meant(scored_store, tmp_path):
    """Stores from before kdpipe recorded the head, the stage ends, the logits flag and the split sizes."""
    older = json.loads((scored_store / STORE_NAME / "zarr.json").read_text())
    identity = older["attributes"][ATTR_KEY]["identity"]
    for key in ("head", "stage_ends", "pretrained", "checkpoint_key"):
        del identity["teacher"][key]
    del identity["logits"], identity["dataset"]["splits"]
    read = StoreIdentity.from_json(identity)
    assert read.teacher == TeacherRecord(identity["teacher"]["name"], identity["teacher"]["checkpoint_sha256"])
    assert read.teacher.head == "loaded" and read.teacher.stage_ends is None  # rebuilt from the model when needed
    assert read.logits and read.dataset.splits == {} and read.amp == "off" and read.augment is None


def test_docs_store_md_shows_the_schema():
    """docs/store.md's layout names exactly the schema's arrays, its attribute key and its format version."""
    text = (Path(__file__).parents[1] / "docs" / "store.md").read_text()
    layout = text.split("```\nfeatures.zarr/\n", 1)[1].split("```", 1)[0]
    names = set()
    for line in layout.splitlines():  # a name column, then two spaces or more, then what it holds
        names.update(re.split(r"\s{2,}", line.strip())[0].split(", "))  # `features/<tap>, logits` under a view
    assert names == {
        "zarr.json",
        "<split>/",
        schema.feature_path("<tap>"),
        schema.LABELS,
        schema.INDICES,
        schema.LOGITS,
        schema.PROGRESS,
        f"{schema.VIEWS}/<v>/",
        schema.PARAMS_ARRAY,
    }
    assert f'attributes["{schema.ATTR_KEY}"]' in layout
    assert text.startswith(f"# The feature store (format version {schema.FORMAT_VERSION})")
    assert f"`DIR/{schema.STORE_NAME}`" in text


def test_a_students_header_and_run_spec_round_trip(scored_store, tmp_path):
    """The student's header reads back as a typed model spec holding the run spec; both write the JSON they read,
    and the run spec is the one distill.json and the epoch checkpoints carry."""
    from safetensors import safe_open

    from pipeline import DistillConfig, distill
    from pipeline.distillation.run_spec import RunSpec
    from pipeline.engine.checkpoints import SPEC_KEY, read_model_spec

    out = tmp_path / "run"
    summary = distill(DistillConfig(store=str(scored_store), out=str(out), student="resnet8", steps=2, device="cpu"))
    with safe_open(str(out / "student.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()[SPEC_KEY])
    spec = read_model_spec(out / "student.safetensors")
    assert spec.to_json() == header and spec.model == "resnet8" and spec.head is None
    run = RunSpec.from_json(spec.run)
    assert run.to_json() == spec.run and run.terms == {} and run.steps == 2
    assert run.settings["student"] == "resnet8" and run.student_taps == summary["student_taps"]
    assert {k: summary[k] for k in spec.run} == spec.run
    with_stones = RunSpec.from_json({**spec.run, "stones": [{"stage": 1}]})  # what Block-KD's term records
    assert with_stones.terms == {"stones": [{"stage": 1}]} and with_stones.settings == run.settings
