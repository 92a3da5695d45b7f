"""P11: extract and distill on 2 torchrun processes against 1 process, on this machine's 2 cores.

The shared workload (`workload.py`): `kdpipe extract` of the teacher's three distilled taps over `--num-images`
synthetic images, then `kdpipe distill` of the resnet8 student on that store for `--steps` steps of batch 128. Each
side is the real CLI in its own processes: one process with 2 torch threads, or `torchrun --nproc-per-node 2` with 1
thread each (torchrun's default), so both sides use both cores and the ratio shows what sharding costs or buys over
intra-op threads, not more hardware. Extract's rate is extract.json's (images over the slowest rank's seconds),
distill's the images of its fastest epoch over that epoch's seconds (`distill_log.csv`): start-up is left out.

    python benchmarks/p11_processes.py [--num-images 4000] [--steps 120]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.layout import DISTILL_LOG, EXTRACT_SUMMARY
from workload import DATASET, STUDENT, TEACHER, TEACHER_TAPS, THREADS, teacher_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def kdpipe(processes: int, *args: str) -> None:
    """The CLI in one process with THREADS threads, or under torchrun in `processes` of one thread each."""
    if processes == 1:
        command = [sys.executable, "-m", "pipeline.cli", *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command += ["-m", "pipeline.cli", *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS // processes)}
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"})


def extract_rate(processes: int, checkpoint: str, out: Path, num_images: int) -> float:
    args = ["extract", "--teacher", TEACHER, "--dataset", DATASET, "--checkpoint", checkpoint, "--device", "cpu"]
    args += ["--layers", ",".join(TEACHER_TAPS), "--max-samples", str(num_images), "--out", str(out)]
    kdpipe(processes, *args)
    return json.loads((out / EXTRACT_SUMMARY).read_text())["splits"]["train"]["images_per_second"]


def distill_rate(processes: int, store: Path, out: Path, steps: int) -> float:
    args = ["distill", str(store), "--student", STUDENT, "--teacher-layers", ",".join(TEACHER_TAPS), "--device", "cpu"]
    args += ["--batch-size", "128", "--steps", str(steps), "--out", str(out)]
    kdpipe(processes, *args)
    with open(out / DISTILL_LOG, newline="") as f:
        epochs = list(csv.DictReader(f))
    whole = epochs[:-1] or epochs  # the last epoch is cut short by the step budget
    return max(float(e["images_per_second"]) for e in whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = teacher_checkpoint(tmp)
        extract = {n: extract_rate(n, checkpoint, tmp / f"extract-{n}", args.num_images) for n in (1, 2)}
        store = tmp / "extract-1"
        distill = {n: distill_rate(n, store, tmp / f"distill-{n}", args.steps) for n in (1, 2)}
    for stage, rates in (("extract", extract), ("distill", distill)):
        print(
            f"{stage}: 1 process {rates[1]:,.0f} img/s, 2 processes {rates[2]:,.0f} img/s -> {rates[2] / rates[1]:.2f}x"
        )
    ratios = f"extract {extract[2] / extract[1]:.2f}x, distill {distill[2] / distill[1]:.2f}x"
    print(f"2 processes over 1 on {THREADS} cores: {ratios}")


if __name__ == "__main__":
    main()
