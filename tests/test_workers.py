"""DataLoader workers (spawned processes, which unpickle the dataset) give extract, distill and probe the results
of loading in the main process, bit for bit, on a JPEG image folder; an unreadable image is still one Error line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import load_file

from helpers import assert_one_line_error, run_cli, weights
from pipeline.engine.checkpoints import save_checkpoint
from pipeline.layout import CLASSIFIER
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import create_model

pytestmark = pytest.mark.slow  # every loader spawns its workers: seconds each


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """3 classes of 40x30 JPEGs (10 train, 4 val each) and a random resnet8 teacher for them."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 4)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k:03d}.jpg", quality=90)
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet8", 3), root / "teacher.safetensors", ModelSpec("resnet8", 3))
    return root


def pipeline_run(root, out, workers: int) -> dict:
    """extract (train and val), distill and probe with `workers` loader workers; the arrays and weights they wrote."""
    data = ["--dataset", "imagefolder", "--data-root", root, "--input-size", 32, "--workers", workers]
    run_cli(
        "extract", *data, "--teacher", "resnet8", "--checkpoint", root / "teacher.safetensors",
        "--splits", "train,val", "--layers", "layer2.0,layer3.0", "--batch-size", 8, "--out", out / "extract",
    )  # fmt: skip
    run_cli(
        "distill", out / "extract", "--student", "resnet8", "--teacher-layers", "layer3.0", "--epochs", 1,
        "--batch-size", 8, "--workers", workers, "--out", out / "distill",
    )  # fmt: skip
    run_cli("probe", out / "distill", "--workers", workers)
    group = zarr.open_group(str(out / "extract" / "features.zarr"), mode="r")
    arrays = {f"{s}/{a}": group[s][a][:] for s in ("train", "val") for a in ("features/layer3.0", "labels")}
    probe = load_file(str(out / "distill" / CLASSIFIER))
    return {"arrays": arrays, "student": weights(out / "distill"), "probe": probe}


def test_workers_give_the_main_process_results(jpeg_folder, tmp_path):
    inline, spawned = pipeline_run(jpeg_folder, tmp_path / "w0", 0), pipeline_run(jpeg_folder, tmp_path / "w2", 2)
    for name, values in inline["arrays"].items():
        assert np.array_equal(values, spawned["arrays"][name]), name
    for name, tensor in inline["student"].items():
        assert torch.equal(tensor, spawned["student"][name]), name
    for name, tensor in inline["probe"].items():
        assert torch.equal(tensor, spawned["probe"][name]), name


COMMANDS = {  # a command that loads the folder with workers, and its arguments
    "extract": lambda root: ["extract", "--teacher", "resnet8", "--checkpoint", root / "teacher.safetensors"],
    "teach": lambda root: ["teach", "--teacher", "resnet8", "--epochs", 1, "--batch-size", 31],  # all 31, one batch
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unreadable_image_in_a_worker_is_one_error_line(jpeg_folder, tmp_path, command):
    bad = tmp_path / "bad"
    (bad / "train" / "bee").mkdir(parents=True)
    (bad / "val").symlink_to(jpeg_folder / "val", target_is_directory=True)
    for c in ("ant", "bee", "cat"):
        (bad / "train" / c).mkdir(exist_ok=True)
        for image in (jpeg_folder / "train" / c).iterdir():
            (bad / "train" / c / image.name).symlink_to(image)
    (bad / "train" / "bee" / "zzz.jpg").write_bytes(b"not a jpeg")
    result = run_cli(
        *COMMANDS[command](jpeg_folder), "--dataset", "imagefolder", "--data-root", bad, "--input-size", 32,
        "--workers", 2, "--out", tmp_path / "x", expect_ok=False,
    )  # fmt: skip
    assert_one_line_error(result, "Error: cannot read image", "zzz.jpg")
