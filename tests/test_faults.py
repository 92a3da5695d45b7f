"""The fault matrix: every command against every fault class. A command that meets a fault exits non-zero with
exactly one `Error:` line naming the file, array or field, no traceback, and leaves nothing incomplete looking
complete; a command the fault does not concern runs as usual.

Store faults: a missing chunk, a damaged chunk, and values no writer stores (NaN, Inf, out-of-range labels and
indices) in each kind of cached array (features, labels, logits, indices), against every command that reads stores.
Config faults: a value of the wrong type for every option of every command.
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
from dataclasses import fields
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
import zarr

from cache.schema import STORE_NAME
from cache.verify import chunk_file
from helpers import assert_one_line_error, load_script, run_cli, small_chunks
from pipeline import ExtractConfig, ScoreConfig, TeachConfig, extract, score, teach
from pipeline.config import COMMANDS as COMMAND_CONFIGS
from pipeline.config import MappingType, Registered, field_types
from pipeline.layout import CLASSIFIER, DISTILL_SUMMARY, PROBE_SUMMARY, SCORES, STUDENT_WEIGHTS

TAPS = ("layer1.0", "layer2.0", "layer3.0")  # resnet8's stage ends, for fitnet
ARRAYS = ("features/layer2.0", "labels", "logits", "indices")
STUDENT = ["--student", "resnet8", "--model-kwargs", "{base_width: 8}", "--steps", 2, "--batch-size", 32]
# What each command reads of a store (features/* is every cached tap); a fault elsewhere must not stop it.
COMMANDS = {
    "score": ({"features/layer2.0", "labels"}, ["score", "{store}", "--top-k", 2, "--no-plot"]),
    "distill feature": (
        {"features/layer2.0", "indices"},
        ["distill", "{store}", *STUDENT, "--method", "feature", "--teacher-layers", "layer2.0,layer3.0"],
    ),
    "distill kd": ({"labels", "logits", "indices"}, ["distill", "{store}", *STUDENT, "--method", "kd"]),
    "distill ce": ({"labels", "indices"}, ["distill", "{store}", *STUDENT, "--method", "ce"]),
    "distill fitnet": (
        {"features/layer2.0", "labels", "indices"},
        ["distill", "{store}", *STUDENT, "--method", "fitnet"],
    ),
    "verify": (set(ARRAYS), ["verify", "{store}"]),
    "info": (set(), ["info", "{store}"]),
}
FAULTS = ("missing chunk", "damaged chunk", "NaN", "Inf", "negative", "too large")


@pytest.fixture(scope="module")
def sound_store(tmp_path_factory) -> Path:
    """A scored store of a tiny teacher: three taps, labels, logits and indices, each over several chunks."""
    root = tmp_path_factory.mktemp("faults")
    taught = teach(
        TeachConfig(
            out=str(root / "teacher"), teacher="resnet8", model_kwargs={"base_width": 8}, epochs=1, device="cpu"
        )
    )
    with small_chunks():
        config = ExtractConfig(
            out=str(root / "store"), teacher="resnet8", checkpoint=taught["checkpoint"], layers=TAPS, device="cpu"
        )
        extract(config)
    score(ScoreConfig(store=str(root / "store"), top_k=2, plot=False))
    return root / "store"


def _inject(store: Path, array_path: str, fault: str) -> None:
    split = zarr.open_group(store / STORE_NAME, mode="r+")["train"]
    array = split[array_path]
    if fault in ("missing chunk", "damaged chunk"):
        chunk = chunk_file(store / STORE_NAME, array, 1)
        if fault == "missing chunk":
            chunk.unlink()
        else:
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0xFF
            chunk.write_bytes(bytes(data))
        return
    row = array[5]
    value = {"NaN": np.nan, "Inf": np.inf, "negative": -3, "too large": 10**6}[fault]
    np.asarray(row).flat[0] = value
    array[5] = row


def _cases():
    for array_path in ARRAYS:
        floats = array_path.startswith("features") or array_path == "logits"
        for fault in FAULTS:
            if fault in (("negative", "too large") if floats else ("NaN", "Inf")):
                continue  # a float array cannot hold an out-of-range label, an integer one no NaN
            yield array_path, fault


@pytest.mark.slow
@pytest.mark.parametrize("array_path,fault", list(_cases()))
def test_every_store_reader_names_the_damage(sound_store, tmp_path, array_path, fault):
    store = tmp_path / "store"
    shutil.copytree(sound_store, store)
    _inject(store, array_path, fault)
    for name, (reads, args) in COMMANDS.items():
        out = tmp_path / name.replace(" ", "-")
        command = [a if a != "{store}" else store for a in args]
        if command[0] == "distill":
            command += ["--out", out, "--device", "cpu"]
        result = run_cli(*command, expect_ok=array_path not in reads)
        if array_path in reads:
            assert_one_line_error(result, array_path.split("/")[-1])
            assert not (out / STUDENT_WEIGHTS).exists() and not (out / DISTILL_SUMMARY).exists(), name


def _wrong_value(kind) -> object:
    """A YAML value of the wrong shape for an option of click type `kind`: a list where a mapping belongs, a mapping
    where anything else does."""
    return [1, 2] if isinstance(kind, MappingType) else {"not": "this"}


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_option_of_every_command_refuses_a_wrongly_typed_config_value(command, tmp_path):
    """Config values go through the command line's types: the wrong shape of value for any option of any command
    is one line naming the file and the option, before any work."""
    config = COMMAND_CONFIGS[command]
    kinds = field_types(config)
    arguments = [_accepted_argument(kinds[f.name], tmp_path) for f in fields(config) if f.metadata["argument"]]
    for f in fields(config):
        if f.metadata["argument"] or not f.metadata["cli"]:
            continue
        path = tmp_path / f"{f.name}.yaml"
        path.write_text(yaml.safe_dump({command: {f.name: _wrong_value(kinds[f.name])}}))
        result = run_cli(command, *arguments, "--config", path, expect_ok=False)
        assert_one_line_error(result, str(path), f"{command}.{f.name}")


def _accepted_argument(kind: click.ParamType, tmp_path: Path) -> str:
    """A positional argument the command line accepts, so that the config file is what fails: a registered name
    (`kdpipe layers MODEL`), else a folder."""
    if isinstance(kind, Registered):
        return getattr(importlib.import_module(kind.module), kind.registry).names()[0]
    return str(tmp_path)


def _scored(folder: Path) -> tuple[list, list]:
    """What a score run concluded: its picks and every tap's Q."""
    scores = json.loads((folder / SCORES).read_text())
    return scores["selected"], [(t["name"], t["Q"]) for t in scores["taps"]]


@pytest.mark.slow
def test_score_and_probe_killed_anywhere_then_rerun_end_as_an_uninterrupted_run(sound_store, tmp_path):
    """SIGKILL at random moments (the start-up, the work, the writing of the results), then a plain rerun: the
    results equal an uninterrupted run's. (extract and distill: scripts/soak.py and test_reliability.py.)"""
    soak = load_script("soak")
    rng = random.Random(3)
    store = tmp_path / "store"
    shutil.copytree(sound_store, store)
    (store / SCORES).unlink()
    command = ["score", str(store), "--top-k", "2", "--no-plot"]
    killed = soak.killed_runs(lambda: command, lambda: (store / SCORES).is_file(), 3, rng, (0.5, 6.0))
    assert _scored(store) == _scored(sound_store)

    run_dir = tmp_path / "run"
    run_cli(
        "distill", sound_store, *STUDENT, "--teacher-layers", "layer2.0,layer3.0", "--out", run_dir, "--device", "cpu"
    )
    whole = tmp_path / "whole"
    shutil.copytree(run_dir, whole)
    run_cli("probe", whole, "--max-iter", 20, "--device", "cpu")
    probe = ["probe", str(run_dir), "--max-iter", "20", "--device", "cpu"]
    killed += soak.killed_runs(lambda: probe, lambda: (run_dir / PROBE_SUMMARY).is_file(), 3, rng, (0.5, 6.0))
    assert killed >= 2
    cut_summary, whole_summary = (json.loads((d / PROBE_SUMMARY).read_text()) for d in (run_dir, whole))
    assert cut_summary | {"run": None, "classifier": None} == whole_summary | {"run": None, "classifier": None}
    assert (run_dir / CLASSIFIER).read_bytes() == (whole / CLASSIFIER).read_bytes()
