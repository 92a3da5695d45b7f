"""The command line: config files with overrides, and one-line errors (no traceback) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import ROOT, assert_one_line_error, run_cli
from pipeline import DistillConfig
from pipeline.engine.checkpoints import save_checkpoint
from pipeline.errors import UserError, first_line, user_message
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import create_model


@pytest.fixture(scope="module")
def foreign_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(create_model("resnet8", 10), folder / "resnet8.safetensors", ModelSpec("resnet8", 10))
    torch.save(create_model("resnet8", 10).state_dict(), folder / "resnet8.pt")
    (folder / "garbage.safetensors").write_bytes(b"not a checkpoint")
    return folder


def extract_args(teacher_ckpt: str, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--teacher",
        "resnet20",
        "--checkpoint",
        teacher_ckpt,
        "--layers",
        "layer3.2",
        "--max-samples",
        "60",
        "--splits",
        "test",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_bad_model_name(tmp_path, digits_teacher):
    args = extract_args(digits_teacher["checkpoint"], tmp_path)
    args[args.index("resnet20")] = "resnet21"
    assert_one_line_error(run_cli(*args, expect_ok=False), "unknown model 'resnet21'", "resnet20")
    assert_one_line_error(run_cli("layers", "nope", expect_ok=False), "unknown model 'nope'")
    assert_one_line_error(run_cli("layers", "timm:not_a_model", expect_ok=False), "cannot create model")


def test_unknown_tap(tmp_path, digits_teacher):
    args = extract_args(digits_teacher["checkpoint"], tmp_path)
    args[args.index("layer3.2")] = "layer9.0"
    assert_one_line_error(run_cli(*args, expect_ok=False), "unknown tap 'layer9.0'", "kdpipe layers")
    assert not (tmp_path / "features.zarr").exists()


def test_missing_checkpoint(tmp_path):
    result = run_cli(*extract_args(str(tmp_path / "none.safetensors"), tmp_path / "out"), expect_ok=False)
    assert_one_line_error(result, "checkpoint not found")
    result = run_cli("extract", "--teacher", "resnet20", "--out", tmp_path / "out", expect_ok=False)
    assert_one_line_error(result, "needs weights", "--checkpoint")


@pytest.mark.parametrize(
    "name,fragments",
    [
        ("resnet8.safetensors", ("holds a 'resnet8', not a 'resnet20'",)),
        ("resnet8.pt", ("does not match the model", "missing keys")),
        ("garbage.safetensors", ("cannot read checkpoint",)),
    ],
)
def test_mismatched_checkpoint(tmp_path, foreign_checkpoints, name, fragments):
    result = run_cli(*extract_args(str(foreign_checkpoints / name), tmp_path), expect_ok=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "features.zarr").exists()


def test_missing_data_root(tmp_path, digits_teacher):
    args = extract_args(
        digits_teacher["checkpoint"], tmp_path, "--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere")
    )
    assert_one_line_error(
        run_cli(*args, expect_ok=False), "data root not found", "cifar-10-batches-py/", "--download", "docs/datasets.md"
    )


def test_out_holding_a_different_store(tmp_path, digits_teacher, foreign_checkpoints):
    run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path))
    before = sorted(p.name for p in (tmp_path / "features.zarr" / "test" / "features").iterdir())
    other = extract_args(digits_teacher["checkpoint"], tmp_path)
    other[other.index("layer3.2")] = "layer2.2"
    assert_one_line_error(run_cli(*other, expect_ok=False), "holds a different store", "taps", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "features.zarr" / "test" / "features").iterdir()) == before
    run_cli(*other, "--overwrite")
    assert sorted(p.name for p in (tmp_path / "features.zarr" / "test" / "features").iterdir()) == [
        "layer2.2",
        "zarr.json",
    ]


def test_out_holding_something_else(tmp_path, digits_teacher):
    (tmp_path / "features.zarr").mkdir()
    (tmp_path / "features.zarr" / "precious.txt").write_text("keep me")
    for extra in ((), ("--overwrite",)):
        result = run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path, *extra), expect_ok=False)
        assert_one_line_error(result)
    assert (tmp_path / "features.zarr" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["extract", "--dataset", "svhn"], ("unknown dataset 'svhn'",)),
        (["teach", "--dataset", "digits", "--batch-size", "0"], ("--batch-size",)),
        (["teach", "--model-kwargs", "[1, 2]"], ("not a mapping",)),
        (["teach", "--device", "tpu"], ("--device",)),
        (["info", "/nonexistent/store"], ("no feature store",)),
    ],
)
def test_other_bad_inputs(args, fragments):
    assert_one_line_error(run_cli(*args, expect_ok=False), *fragments)


def test_unknown_split(tmp_path, digits_teacher):
    args = extract_args(digits_teacher["checkpoint"], tmp_path)
    args[args.index("test")] = "val"
    assert_one_line_error(run_cli(*args, expect_ok=False), "no split 'val'", "train, test")


def test_config_defaults_and_command_line_overrides(tmp_path, digits_teacher):
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": "digits",
                "device": "cpu",
                "teacher": "resnet20",
                "seed": 3,
                "extract": {
                    "checkpoint": digits_teacher["checkpoint"],
                    "layers": ["layer3.2"],
                    "splits": ["test"],
                    "max_samples": 50,
                    "out": str(tmp_path / "from_config"),
                },
            }
        )
    )
    run_cli("extract", "--config", config, "--max-samples", 40, "--out", tmp_path / "cli")
    args = yaml.safe_load((tmp_path / "cli" / "extract_args.yaml").read_text())
    assert args["max_samples"] == 40 and args["seed"] == 3 and args["layers"] == ["layer3.2"]
    assert args["out"] == str(tmp_path / "cli") and not (tmp_path / "from_config").exists()


@pytest.mark.parametrize(
    "content,fragment",
    [
        ({"extract": {"max_sample": 3}}, "has no option 'max_sample'"),
        ({"batchsize": 3}, "unknown key 'batchsize'"),
        ({"extract": {"max_samples": "many"}}, "many"),
        ("- a list", "must hold a mapping"),
    ],
)
def test_bad_config(tmp_path, content, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    assert_one_line_error(run_cli("extract", "--config", config, expect_ok=False), fragment)


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("teach", "--config", tmp_path / "none.yaml", expect_ok=False), "cannot read")


def test_pickled_model_checkpoint_is_refused(tmp_path, digits_teacher):
    torch.save(create_model("resnet20", 10), tmp_path / "model.pt")  # a whole pickled module, not weights
    result = run_cli(*extract_args(str(tmp_path / "model.pt"), tmp_path / "out"), expect_ok=False)
    assert_one_line_error(result, "cannot read checkpoint")


def test_empty_splits_and_bad_compression(tmp_path, digits_teacher):
    args = extract_args(digits_teacher["checkpoint"], tmp_path)
    args[args.index("test")] = ","
    assert_one_line_error(run_cli(*args, expect_ok=False), "--splits names no split")
    result = run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path, "--compression", "lz5"), expect_ok=False)
    assert_one_line_error(result, "compression 'lz5'")
    assert not (tmp_path / "features.zarr").exists()
    run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path))  # nothing half-made blocks a valid rerun


def test_interrupted_split_creation_is_redone(tmp_path, digits_teacher):
    import zarr

    run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path))
    group = zarr.open_group(str(tmp_path / "features.zarr"), mode="r+")
    group.attrs["kdpipe"] = {**group.attrs["kdpipe"], "complete": False}
    del group["test"]
    group.create_group("test")  # as if creation died before the split's attributes were written
    run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path))
    assert "complete    yes" in run_cli("info", tmp_path).output


def test_overwrite_keeps_a_matching_store(tmp_path, digits_teacher):
    run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path))
    marker = tmp_path / "features.zarr" / "test" / "labels" / "zarr.json"
    before = marker.stat().st_mtime_ns
    assert "already complete" in run_cli(*extract_args(digits_teacher["checkpoint"], tmp_path, "--overwrite")).output
    assert marker.stat().st_mtime_ns == before


def test_teach_refuses_to_replace_weights(digits_teacher):
    out = Path(digits_teacher["checkpoint"]).parent
    result = run_cli("teach", "--out", out, "--epochs", 1, expect_ok=False)
    assert_one_line_error(result, "exists", "--overwrite")


def test_an_error_from_a_dataloader_worker_is_its_own_message():
    """torch re-raises a worker's exception in the main process with the worker's traceback as its message; what
    the user reads (and what a wrapper takes as the first line) is the worker's message again."""
    from torch._utils import ExceptionWrapper

    try:
        raise UserError("cannot read image a/b.jpg: Truncated File Read")
    except UserError:
        wrapped = ExceptionWrapper(exc_info=sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(UserError) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value)
    assert user_message(raised.value) == first_line(raised.value) == "cannot read image a/b.jpg: Truncated File Read"


# In a fresh interpreter: the exit status of `kdpipe --help`, of every `kdpipe CMD --help` and of a mistyped option,
# then which of the heavy libraries got imported.
HELP_WITHOUT_TORCH = """
import json, sys
from click.testing import CliRunner
from pipeline.cli import cli
calls = [["--help"], *([name, "--help"] for name in cli.commands), ["teach", "--epoch", "3"]]
codes = {" ".join(args): CliRunner().invoke(cli, args).exit_code for args in calls}
heavy = {"torch", "torchvision", "timm", "dask", "zarr"}
print(json.dumps({"codes": codes, "imported": sorted(heavy & set(sys.modules))}))
"""


def test_help_and_usage_errors_import_no_torch():
    """torch (with torchvision, timm, dask) takes seconds and ~900 MB to import, Zarr a fifth of a second: help and a
    usage error need none of them."""
    run = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["imported"] == []
    assert found["codes"].pop("teach --epoch 3") == 2  # no such option: a usage error
    assert found["codes"]["--help"] == 0 and "distill --help" in found["codes"] and len(found["codes"]) > 15
    assert set(found["codes"].values()) == {0}


@pytest.mark.parametrize(
    "args,option,guess",
    [
        (["distill", "runs/x", "--method", "feture"], "'--method'", "'feature'"),
        (["distill", "runs/x", "--losses", "{feature_mes: 1}"], "'--losses'", "'feature_mse'"),
        (["distill", "runs/x", "--student", "resnet200"], "'--student'", "'resnet20'"),
        (["layers", "resnet200"], "'MODEL'", "'resnet20'"),
        (["teach", "--dataset", "fasion-mnist"], "'--dataset'", "'fashion-mnist'"),
        (["extract", "--augment", "crop-flp"], "'--augment'", "'crop-flip'"),
    ],
)
def test_a_mistyped_name_is_a_usage_error_with_a_guess(args, option, guess):
    """A name no registry holds exits 2 as a mistyped option does, with click's line and the closest name."""
    result = run_cli(*args, expect_ok=False)
    assert result.exit_code == 2
    assert_one_line_error(result, f"Error: Invalid value for {option}: unknown ", f"; did you mean {guess}? known: ")


def test_a_mistyped_name_in_the_python_api_gets_the_same_guess():
    with pytest.raises(UserError, match=r"^method: unknown method 'feture'; did you mean 'feature'\? known: "):
        DistillConfig(store="runs/x", method="feture")


@pytest.mark.parametrize("command", ["distill", "score"])
def test_a_folder_without_a_store_says_what_makes_one(tmp_path, command):
    out = ["--out", tmp_path / "run"] if command == "distill" else []
    result = run_cli(command, tmp_path, *out, "--device", "cpu", expect_ok=False)
    assert_one_line_error(result, f"no feature store at {tmp_path}; `kdpipe extract --out {tmp_path}` makes one")
