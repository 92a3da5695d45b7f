"""The CIFAR-size workload the speed benchmarks share (issue 5): 10k random 32×32 images (`synthetic`), a
CIFAR-style ResNet-18 teacher (random weights: speed does not depend on them) and a resnet8 student, 2 threads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

TEACHER = "resnet18_cifar"
STUDENT = "resnet8"
DATASET = "synthetic"
TEACHER_TAPS = ("layer2.1", "layer3.1", "layer4.1")  # paired with resnet8's three stage ends
THREADS = 2


def kdpipe(*args: str) -> None:
    """Runs the installed `kdpipe` command (the real CLI, in its own process); fails loudly, with its stderr."""
    run = subprocess.run([str(Path(sys.executable).parent / "kdpipe"), *args], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"kdpipe {' '.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")


def extract_split(out: Path, checkpoint: str, num_images: int, device: str = "cpu", flags: Sequence[str] = ()) -> dict:
    """`kdpipe extract` of the workload's teacher on `num_images` of its images (a stratified subset below all 10k)
    into `out`, `flags` added; extract.json's summary of the train split (images/s, sizes)."""
    from pipeline.layout import EXTRACT_SUMMARY

    subset = ["--max-samples", str(num_images)] if num_images < 10_000 else []
    kdpipe(
        "extract", "--teacher", TEACHER, "--dataset", DATASET, "--checkpoint", checkpoint, "--device", device,
        "--out", str(out), *subset, *flags,
    )  # fmt: skip
    return json.loads((out / EXTRACT_SUMMARY).read_text())["splits"]["train"]


def speed_flags(amp: str = "off", channels_last: bool = False) -> list[str]:
    """The `pipeline.engine.precision` options of extract and distill, as command-line flags."""
    return ["--amp", amp] + (["--channels-last"] if channels_last else [])


def setup_threads() -> None:
    torch.set_num_threads(THREADS)


def teacher_checkpoint(folder: Path) -> str:
    from pipeline.engine.checkpoints import save_checkpoint
    from pipeline.models.spec import ModelSpec
    from pipeline.models.zoo import create_model

    path = folder / "teacher.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(create_model(TEACHER, 10), path, ModelSpec(TEACHER, 10))
    return str(path)


class Timer:
    """Wall-clock seconds of a `with` block, CUDA's queued work included."""

    def __enter__(self) -> Timer:
        _synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _synchronize()
        self.seconds = time.perf_counter() - self.start


def _synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
