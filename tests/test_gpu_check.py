"""benchmarks/gpu_check.sh: its dry mode runs every step on the CPU (so the GPU check cannot rot), and without CUDA
the real one says so in one line."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow  # about a minute: five kdpipe processes
def test_the_dry_run_measures_every_step(tmp_path):
    figures_file = tmp_path / "figures.json"
    run = subprocess.run(
        [str(SCRIPT), "--json", str(figures_file)],
        env={**os.environ, "KDPIPE_GPU_CHECK": "dry"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("GPU check: P1 ")
    figures = json.loads(figures_file.read_text())
    assert figures["device"] == "CPU (dry)" and figures["num_images"] == 256
    for p2 in (figures["p2_fp32"], figures["p2_amp"]):
        assert p2["bare_forward_images_per_second"] > 0 and p2["extract_images_per_second"] > 0
    assert figures["p2_amp"]["amp"] == "bf16" and figures["p2_amp"]["channels_last"]
    assert figures["p1_amp"]["cached_seconds"] > 0 and figures["p1_amp"]["ideal_speedup"] > 1
    differences = figures["target_difference"]
    assert {"features/layer2.1", "features/layer4.1", "logits"} <= differences.keys()
    # bf16 keeps 8 mantissa bits: the targets differ, by well under a tenth of their range
    assert all(0 < d["max_relative"] < 0.1 and d["mean_relative"] < d["max_relative"] for d in differences.values())
    assert figures["score"]["seconds"] > 0


@pytest.mark.slow  # CI only: a torch import in its own process
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_real_check_refuses_in_one_line(tmp_path):
    run = subprocess.run([str(SCRIPT), "--json", str(tmp_path / "f.json")], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device on this machine; run it where there is one, or pass --dry for the CPU"
    ]
    assert not (tmp_path / "f.json").exists()
