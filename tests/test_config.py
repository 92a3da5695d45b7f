"""One typed config per command: the single source of every option, YAML and flags held to the same types, the
resolved config written before work starts, the library silent on stdout, and every shipped config resolvable."""

from __future__ import annotations

import ast
import inspect
from dataclasses import MISSING, fields, replace
from pathlib import Path

import click
import pytest
import yaml

import pipeline
from helpers import ROOT, STUDENT, assert_one_line_error, run_cli
from pipeline import DistillConfig, ExtractConfig, distill
from pipeline.cli import cli
from pipeline.config import COMMANDS, CommaList, ConfigError, file_values, resolve
from pipeline.engine.training import Trainer
from pipeline.errors import UserError
from pipeline.layout import args_file

STAGES = {"teach": pipeline.teach, "extract": pipeline.extract, "score": pipeline.score}
STAGES |= {"distill": pipeline.distill, "probe": pipeline.probe, "report": pipeline.report}
SHIPPED = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_click_options_are_the_config_fields(name):
    """Every command's parameters are its config's fields, with the same default, help and type object."""
    config, command = COMMANDS[name], cli.commands[name]
    params = {p.name: p for p in command.params if p.name != "config_file"}
    shown = {f.name: f for f in fields(config) if f.metadata["cli"]}
    assert set(params) == set(shown)
    for name, f in shown.items():
        param = params[name]
        default = None if f.default is MISSING else f.default
        if isinstance(param.type, CommaList) and default is not None:
            assert param.default == ",".join(map(str, default))
        else:
            assert param.default == default, name
        if isinstance(param, click.Option):
            assert param.help == f.metadata["help"]
            assert param.is_flag or param.type is pipeline.config.field_types(config)[f.name]


def test_no_option_default_is_written_twice():
    """The stage functions take their config and nothing else, and no click parameter in the package carries a
    literal default: every default is the config field's."""
    for name, stage in STAGES.items():
        params = list(inspect.signature(stage).parameters.values())
        assert len(params) == 1 and params[0].annotation in (COMMANDS[name], COMMANDS[name].__name__), name
        assert params[0].default is inspect.Parameter.empty, name
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("option", "Option", "Argument"):
                literal = [k for k in node.keywords if k.arg == "default" and isinstance(k.value, ast.Constant)]
                assert not literal, f"{path.name}:{node.lineno} writes an option default of its own"


def test_config_file_values_are_checked_by_the_option_types(tmp_path):
    def fails(content: dict, *fragments: str) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(content))
        with pytest.raises(UserError) as err:
            file_values(COMMANDS["teach"], path)
        for fragment in (str(path), *fragments):
            assert fragment in str(err.value)

    fails({"teach": {"epochs": "many"}}, "teach.epochs", "'many' is not a valid integer")
    fails({"teach": {"epochs": 2.7}}, "2.7 is not a valid integer")  # never truncated to 2
    fails({"teach": {"epochs": True}}, "True is not a valid integer")
    fails({"teach": {"epochs": 0}}, "0 is not in the range x>=1")
    fails({"teach": {"lr": [1, 2]}}, "teach.lr", "expected a single value")
    fails({"data_root": {"a": 1}}, "teach.data_root", "expected a single value")
    fails({"teach": {"download": 3}}, "3 is not a valid boolean")
    fails({"teach": {"epoch": 3}}, "`teach` has no option 'epoch'")


def test_command_line_overrides_the_file_and_the_file_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "teach": {"epochs": 5, "lr": 0.5}}))
    config = resolve(COMMANDS["teach"], path, {"epochs": 7})
    assert (config.seed, config.epochs, config.lr, config.batch_size) == (3, 7, 0.5, 128)


def test_python_configs_are_checked_like_the_command_line():
    assert ExtractConfig(splits="train,test", max_samples="40").splits == ("train", "test")
    with pytest.raises(ConfigError, match="max_samples: 0 is not in the range x>=1"):
        ExtractConfig(max_samples=0)
    with pytest.raises(ConfigError, match="store: is required"):
        DistillConfig(store=None)
    with pytest.raises(ConfigError, match="loss 'kd' has no setting 'temp'; it takes weight, temperature"):
        DistillConfig(store="s", losses={"kd": {"temp": 2}})
    assert DistillConfig(store="s", losses={"kd": 0.5, "ce": {"weight": "2"}}).losses == {
        "kd": {"weight": 0.5},
        "ce": {"weight": 2.0},
    }


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_configs_resolve_every_value(config, tmp_path):
    """Every value of every shipped config converts under its command's types (a `--help` would accept any)."""
    data = yaml.safe_load(Path(config).read_text())
    for name, command in COMMANDS.items():
        section = data.get(name) or {}
        given = {"model": "resnet8"}  # `kdpipe layers MODEL`; every other required value is a path
        missing = [f.name for f in fields(command) if f.default is MISSING and f.name not in section]
        required = {name: given.get(name, str(tmp_path)) for name in missing}
        resolved = resolve(command, config, required).to_dict()
        for key, value in section.items():
            if key != "losses":  # normalised to {loss: {weight, ...}}
                assert resolved[key] == value, (name, key)
    if "report" in data:  # the report's runs take the distill and probe sections
        report = resolve(COMMANDS["report"], config)
        assert set(data.get("distill", {})) <= set(report.distill) and set(data.get("probe", {})) <= set(report.probe)


def test_a_bad_value_in_a_shipped_config_is_found(tmp_path):
    broken = tmp_path / "digits.yaml"
    broken.write_text((ROOT / "configs" / "digits.yaml").read_text().replace("epochs: 15", "epochs: many", 1))
    with pytest.raises(UserError, match="teach.epochs: 'many' is not a valid integer"):
        resolve(COMMANDS["teach"], broken)
    assert_one_line_error(run_cli("teach", "--config", broken, expect_ok=False), "teach.epochs", "'many'")


def test_resolved_config_is_written_before_the_work_starts(scored_store, tmp_path, monkeypatch):
    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "run_epoch", dies)
    config = DistillConfig(store=str(scored_store), out=str(tmp_path / "run"), **STUDENT)
    with pytest.raises(KeyboardInterrupt):
        distill(config)
    written = yaml.safe_load(args_file(tmp_path / "run", "distill").read_text())
    assert written == config.to_dict() and written["student"] == "resnet8" and written["epochs"] == 2


def test_library_logs_and_only_the_command_line_prints(scored_store, tmp_path):
    """Per-epoch lines are log records on stderr; stdout holds the command's result; --quiet keeps warnings only."""
    args = ["distill", scored_store, "--student", "resnet8", "--epochs", 1, "--device", "cpu"]
    result = run_cli(*args, "--out", tmp_path / "a")
    assert result.stdout.splitlines() == [line for line in result.stdout.splitlines() if line.startswith("feature:")]
    assert "epoch 1: feature_mse" in result.stderr
    quiet = run_cli("--quiet", *args, "--out", tmp_path / "b")
    assert "epoch" not in quiet.stderr and quiet.stdout.startswith("feature:")
    assert "pipeline.engine.training: epoch 1" in run_cli("-v", *args, "--out", tmp_path / "c").stderr


def test_report_runs_the_stages_through_the_python_api():
    tree = ast.parse((ROOT / "pipeline" / "stages" / "report.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {"distill", "probe"} <= imported and not {"cli", "click"} & imported


def test_top_level_keys_are_options_not_positional_arguments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet9\n")  # `model` is only `kdpipe layers MODEL`; meant: student
    with pytest.raises(UserError, match="unknown key 'model'"):
        resolve(COMMANDS["distill"], path, {"store": "s"})


def test_report_plan_takes_the_sections_and_owns_only_its_settings(tmp_path):
    from pipeline import ReportConfig
    from pipeline.stages.report import plan

    config = ReportConfig(
        store="s",
        out=str(tmp_path),
        methods="ce,ce,feature+no-unlabelled-distill",
        seeds=3,
        distill={"device": "cpu", "steps": 5, "seed": 9, "out": "elsewhere"},
        probe={"max_iter": 7},
    )
    runs = plan(config)
    assert [(r.entry, r.seed) for r in runs] == [("ce", 3), ("feature+no-unlabelled-distill", 3)]  # once each
    ce, strict = runs
    assert (ce.distill.device, ce.distill.steps, ce.distill.seed, ce.probe.max_iter) == ("cpu", 5, 3, 7)
    assert ce.distill.out == str(tmp_path / "ce" / "seed-3") and strict.distill.unlabelled_distill is False
    assert plan(replace(config, device="cuda:0"))[0].distill.device == "cuda:0"  # the report's device when given
    with pytest.raises(UserError, match="--no-online-teacher` is not a flag"):
        plan(replace(config, methods=("feature+no-online-teacher",)))
    with pytest.raises(UserError, match="names no method"):
        plan(replace(config, methods=()))


# Where each command writes: the commands whose outputs go to object storage too, and those that write local folders.
WRITES_ANYWHERE = {("extract", "out"), ("distill", "out"), ("probe", "run")}
WRITES_LOCALLY = {("teach", "out"), ("report", "out"), ("q-test", "out"), ("summary", "folder")}


def test_every_output_and_store_option_is_a_location_that_says_where_it_may_be():
    """Every --out, store, run and folder option is a `Location`: a command writing local folders only refuses a URL
    of object storage (from the command line and from Python alike), the others take it as given."""
    from pipeline.config import Location, field_types

    places = {
        (name, f): kind
        for name, config in COMMANDS.items()
        for f, kind in field_types(config).items()
        if f in ("out", "store", "run", "folder")
    }
    assert all(isinstance(kind, Location) for kind in places.values()), places
    assert {p for p, kind in places.items() if not kind.object_storage} == WRITES_LOCALLY
    assert WRITES_ANYWHERE <= {p for p, kind in places.items() if kind.object_storage}
    for name, option in WRITES_LOCALLY:
        with pytest.raises(ConfigError, match=f"{option}: s3://b/x: this command writes to a local folder only"):
            _config(name, option, "s3://b/x")
    for name, option in WRITES_ANYWHERE:
        assert getattr(_config(name, option, "s3://b/x"), option) == "s3://b/x"


def _config(command: str, option: str, value: str):
    """`command`'s config with `option` set to `value`, its other required options to a placeholder."""
    config = COMMANDS[command]
    required = {f.name: "s" for f in fields(config) if f.default is MISSING and f.name != option}
    return config(**required, **{option: value})


def test_a_config_file_that_is_not_utf8_or_gives_a_path_a_number_is_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"teach:\n  epochs: 1\n  \xff\xfe: x\n")
    assert_one_line_error(run_cli("teach", "--config", binary, expect_ok=False), str(binary), "is not UTF-8 text")
    for option in ("data_root", "checkpoint", "out"):
        numeric = tmp_path / f"{option}.yaml"
        numeric.write_text(yaml.safe_dump({"extract": {option: 5}}))
        result = run_cli("extract", "--config", numeric, expect_ok=False)
        assert_one_line_error(result, str(numeric), f"extract.{option}: expected a path, not 5")
    result = run_cli("extract", "--data-root", "s3://bucket/data", expect_ok=False)
    assert_one_line_error(result, "s3://bucket/data: kdpipe extract reads datasets from a local folder only")


def test_a_value_echoed_in_an_error_is_bounded(tmp_path):
    """A 400-byte YAML of nested aliases expands to 10^8 items: the error line shows a bounded sketch of it (it was
    half a gigabyte)."""
    anchors = "".join(
        f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 10) if i else ', '.join(['x'] * 10)}]\n" for i in range(8)
    )
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("teach:\n  model_kwargs:\n    k:\n" + anchors + "  epochs: *a7\n")
    result = run_cli("teach", "--config", bomb, expect_ok=False)
    assert_one_line_error(result, "teach.epochs: expected a single value, not [[[...], [...], [...], [...], ...], ")
    assert len(result.output) < 400
