"""A weights file's kdpipe header is parsed through one typed schema (`ModelSpec`): a header that is not JSON, not an
object, or holds a field of the wrong type is one `Error:` line naming the file and the field, in every command that
reads one (extract's teacher, probe's student, a classifier's loader)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from helpers import assert_one_line_error, run_cli
from pipeline import load_classifier
from pipeline.engine.checkpoints import SPEC_KEY
from pipeline.errors import UserError
from pipeline.models.zoo import create_model

BAD_HEADERS = {
    "not JSON": ("{model: resnet8", "Expecting property name"),
    "not an object": ("[1, 2]", "a JSON object is expected, not list"),
    "model_kwargs a list": (
        json.dumps({"model": "resnet8", "num_classes": 10, "model_kwargs": [1]}),
        "model_kwargs is list, not dict",
    ),
    "num_classes a string": (json.dumps({"model": "resnet8", "num_classes": "10"}), "num_classes is str, not int"),
    "no model": (json.dumps({"num_classes": 10}), "model is missing"),
}


def _rewritten(source, target, header: str):
    """`source`'s tensors under another kdpipe header."""
    save_file(load_file(source), str(target), metadata={SPEC_KEY: header})
    return target


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_extract_refuses_a_teacher_header_it_cannot_read(case, tmp_path):
    header, message = BAD_HEADERS[case]
    weights = tmp_path / "teacher.safetensors"
    save_file(create_model("resnet8", 10).state_dict(), str(weights), metadata={SPEC_KEY: header})
    result = run_cli(
        "extract", "--teacher", "resnet8", "--checkpoint", weights, "--out", tmp_path / "x", expect_ok=False
    )
    assert_one_line_error(result, str(weights), SPEC_KEY, message)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def probed_run(scored_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("headers") / "run"
    run_cli("distill", scored_store, "--student", "resnet8", "--steps", 2, "--out", run, "--device", "cpu")
    run_cli("probe", run, "--max-iter", 5, "--device", "cpu")
    return run


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_probe_and_the_classifier_loader_refuse_a_header_they_cannot_read(case, probed_run, tmp_path):
    header, message = BAD_HEADERS[case]
    run = shutil.copytree(probed_run, tmp_path / "run")
    _rewritten(probed_run / "student.safetensors", run / "student.safetensors", header)
    assert_one_line_error(run_cli("probe", run, "--device", "cpu", expect_ok=False), "student.safetensors", message)
    _rewritten(probed_run / "classifier.safetensors", run / "classifier.safetensors", header)
    with pytest.raises(UserError, match=message):
        load_classifier(run / "classifier.safetensors")
