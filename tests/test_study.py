"""`make fashion` (`kdpipe study FILE`) on a reduced Fashion-MNIST config: killed in the middle and run again, it ends
with the same teacher, store, scores, Q test and report as a run never interrupted."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.transforms import v2

from helpers import assert_one_line_error, run_cli
from pipeline import ExtractConfig, ScoreConfig, extract, score
from pipeline.data.datasets import _digits_arrays
from pipeline.layout import Q_TEST_SUMMARY, REPORT_SUMMARY, SCORES, TEACHER_WEIGHTS, score_files
from pipeline.stages.study import current_scores

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped: the big-endian magic (0, 0, 8, ndim), the dims, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fashion_like(root: Path) -> Path:
    """The digits' 1,797 images at 28×28 as Fashion-MNIST's four gzip files: 1,437 train, 360 test."""
    pixels, labels, train, test = _digits_arrays()
    images = v2.functional.resize(torch.from_numpy(pixels.copy())[:, None], [28, 28], antialias=True)[:, 0].numpy()
    root.mkdir()
    for prefix, rows in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[rows])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
    return root


def reduced_config(folder: Path, data: Path) -> Path:
    """configs/fashion-mnist.yaml's stages at toy size, everything written under `folder`."""
    runs = folder / "runs"
    every_epoch = {"checkpoint_seconds": 0}  # a checkpoint after every epoch: a kill loses at most one
    config = {
        "dataset": "fashion-mnist",
        "data_root": str(data),
        "device": "cpu",
        "teacher": "resnet8",
        "teach": {"out": str(runs / "teacher"), "epochs": 3, "batch_size": 64, **every_epoch},
        "extract": {
            "checkpoint": str(runs / "teacher" / TEACHER_WEIGHTS),
            "out": str(runs / "extract"),
            "max_samples": 400,
        },
        "score": {"top_k": 2, "plot": False},
        "distill": {
            "student": "resnet8",
            "model_kwargs": {"base_width": 4},
            "student_layers": ["layer2.0", "layer3.0"],
            "steps": 6,
            "batch_size": 32,
            "label_fraction": 0.5,
            **every_epoch,
        },
        "probe": {"max_iter": 30},
        "q-test": {"store": str(runs / "extract"), "out": str(runs / "q"), "seeds": [0], "bootstrap": 200},
        "report": {
            "store": str(runs / "extract"),
            "out": str(runs / "report"),
            "methods": ["ce", "kd", "feature"],
            "seeds": [0],
            "label_fractions": [0.25, 0.5],
            "plot": False,
        },
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_fashion(config: Path) -> subprocess.Popen:
    """`make fashion` on `config`, in its own process group (so that a kill takes every process it started)."""
    return subprocess.Popen(
        ["make", "-s", "fashion", f"FASHION_CONFIG={config}"],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    return output


def kill_when(process: subprocess.Popen, exists: Path) -> None:
    """SIGKILL the whole study as soon as `exists` appears (the study must not have finished by then)."""
    deadline = time.monotonic() + 600
    while not exists.exists():
        assert process.poll() is None, f"the study ended before {exists} appeared:\n{process.communicate()[0]}"
        assert time.monotonic() < deadline, f"{exists} never appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def outcome(folder: Path) -> dict:
    """What a study ends with, less the paths that name its own folder."""
    runs = folder / "runs"
    q_test = json.loads((runs / "q" / Q_TEST_SUMMARY).read_text())
    report = json.loads((runs / "report" / REPORT_SUMMARY).read_text())
    scores = json.loads((runs / "extract" / SCORES).read_text())
    return {
        "teacher": (runs / "teacher" / TEACHER_WEIGHTS).read_bytes(),
        "Q": {t["name"]: t["Q"] for t in scores["taps"]},
        "q_taps": q_test["taps"],
        "predictors": q_test["predictors"],
        "sets": q_test["sets"],
        "methods": [{k: m[k] for k in ("method", "top1", "gain")} for m in report["methods"]],
        "sweep": [[(m["method"], m["top1"]) for m in f["methods"]] for f in report["sweep"]["fractions"]],
    }


@pytest.mark.slow
def test_a_killed_study_resumes_and_ends_with_the_same_results(tmp_path):
    data = fashion_like(tmp_path / "data")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    output = finish(make_fashion(reduced_config(whole, data)))
    assert "q-test: done" in output and "report: done" in output
    config = reduced_config(killed, data)
    # Killed twice: during the teacher's training, then in the middle of the Q test.
    kill_when(make_fashion(config), killed / "runs" / "teacher" / "epoch-001.state.pt")
    assert not (killed / "runs" / "teacher" / TEACHER_WEIGHTS).exists()
    kill_when(make_fashion(config), killed / "runs" / "q" / "tap-layer1.0" / "seed-0" / "probe.json")
    assert not (killed / "runs" / "q" / Q_TEST_SUMMARY).exists()
    finish(make_fashion(config))
    assert outcome(killed) == outcome(whole)
    # A finished study run again reuses everything: the scores are not rewritten.
    scores = killed / "runs" / "extract" / SCORES
    before = scores.stat().st_mtime_ns
    finish(make_fashion(config))
    assert scores.stat().st_mtime_ns == before


def test_a_config_without_stage_sections_is_refused(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("dataset: digits\n")
    assert_one_line_error(run_cli("study", path, expect_ok=False), f"{path} has no stage section")


def test_scores_count_as_current_only_for_the_same_store_settings_and_a_finished_run(digits_teacher, tmp_path):
    store = tmp_path / "extract"
    extract(
        ExtractConfig(out=str(store), checkpoint=digits_teacher["checkpoint"], layers=("layer3.2",), max_samples=100)
    )
    config = ScoreConfig(store=str(store), top_k=1, plot=False)
    written = score(config)
    assert current_scores(config) == json.loads((store / SCORES).read_text()) and written["selected"] == ["layer3.2"]
    assert current_scores(replace(config, top_k=2)) is None  # other settings
    _, _, args = score_files(store / "features.zarr")
    os.utime(args, ns=(time.time_ns() + 10**9,) * 2)  # settings written after the scores: an unfinished run
    assert current_scores(config) is None
    score(config)
    extract(replace(ExtractConfig(out=str(store), checkpoint=digits_teacher["checkpoint"]), max_samples=120,
                    layers=("layer3.2",), overwrite=True))  # fmt: skip
    assert current_scores(config) is None  # another store in the same place
