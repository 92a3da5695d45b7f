"""Crash-safety soak: SIGKILL `kdpipe teach`, `kdpipe extract` and `kdpipe distill` at random moments, resume, and
check the result is byte-identical to an uninterrupted run.

    python scripts/soak.py --kills 10 [--seed 0]      # prints kills survived and bytes compared
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.layout import (
    DISTILL_SUMMARY,
    EXTRACT_SUMMARY,
    STORE_NAME,
    STUDENT_WEIGHTS,
    TEACH_SUMMARY,
    TEACHER_WEIGHTS,
    checkpoint_epochs,
)

ROOT = Path(__file__).resolve().parents[1]
# The kdpipe command (its name sets extract's OpenMP wait policy, pipeline/__init__.py) running this checkout's code,
# which PYTHONPATH puts before an installed kdpipe's (an editable install may point at another worktree).
KDPIPE = [str(Path(sys.executable).parent / "kdpipe")]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def popen(args: list[str], stderr=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([*KDPIPE, *args], stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=ENV)


def run(args: list[str]) -> None:
    result = subprocess.run([*KDPIPE, *args], capture_output=True, text=True, cwd=ROOT, env=ENV)
    if result.returncode:
        raise RuntimeError(f"kdpipe {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")


def killed_runs(make_args, done, kills: int, rng: random.Random, window: tuple[float, float]) -> int:
    """Starts `make_args()` and SIGKILLs it after a random delay, `kills` times (fewer if it finishes first),
    then runs it to completion. Returns the number of processes killed."""
    killed = 0
    while killed < kills and not done():
        process = popen(make_args())
        time.sleep(rng.uniform(*window))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.wait()
    if not done():
        run(make_args())
    return killed


def zarr_bytes_equal(first: Path, second: Path) -> int:
    """Asserts every array of two stores holds identical bytes; returns the bytes compared."""
    import zarr

    a, b = zarr.open_group(str(first), mode="r"), zarr.open_group(str(second), mode="r")
    compared = 0
    for split_name, split in a.groups():
        for path in split.attrs["arrays"]:
            left, right = split[path][:], b[f"{split_name}/{path}"][:]
            assert left.tobytes() == right.tobytes(), f"{split_name}/{path} differs"
            compared += left.nbytes
    assert b.attrs["kdpipe"]["complete"]
    return compared


def soak_teach(tmp: Path, kills: int, rng: random.Random) -> tuple[int, int]:
    """Teaches tmp/teacher (the teacher the extract soak uses) uninterrupted, then again under kills spread over
    three quarters of the time the uninterrupted run took, so they land in resumed runs too; returns (kills,
    bytes compared)."""
    args = ["--teacher", "resnet20", "--epochs", "4", "--device", "cpu", "--checkpoint-seconds", "0"]
    start = time.perf_counter()
    run(["teach", *args, "--out", str(tmp / "teacher")])
    seconds = time.perf_counter() - start
    out = tmp / "teacher-cut"

    def command() -> list[str]:
        resume = ["--resume"] if checkpoint_epochs(out) else []
        return ["teach", *args, "--out", str(out), *resume]

    killed = killed_runs(command, lambda: (out / TEACH_SUMMARY).exists(), kills, rng, (2.0, max(3.0, 0.75 * seconds)))
    whole, cut = (tmp / "teacher" / TEACHER_WEIGHTS).read_bytes(), (out / TEACHER_WEIGHTS).read_bytes()
    assert whole == cut, "the resumed teacher's weights differ"
    return killed, len(whole)


def soak_extract(tmp: Path, checkpoint: str, kills: int, rng: random.Random) -> tuple[int, int]:
    args = [
        "--teacher",
        "resnet20",
        "--checkpoint",
        checkpoint,
        "--splits",
        "train,test",
        "--batch-size",
        "32",
        "--device",
        "cpu",
    ]
    run(["extract", *args, "--out", str(tmp / "reference")])
    done = lambda: (tmp / "killed" / EXTRACT_SUMMARY).exists()  # noqa: E731 (written last, after completion)
    killed = killed_runs(lambda: ["extract", *args, "--out", str(tmp / "killed")], done, kills, rng, (2.0, 5.0))
    return killed, zarr_bytes_equal(tmp / "reference" / STORE_NAME, tmp / "killed" / STORE_NAME)


def soak_distill(tmp: Path, kills: int, rng: random.Random) -> tuple[int, int]:
    from safetensors.torch import load_file

    store = str(tmp / "reference")
    args = [
        "--student",
        "resnet8",
        "--teacher-layers",
        "layer1.2,layer2.2",
        "--student-layers",
        "layer1.0,layer2.0",
        "--epochs",
        "8",
        "--batch-size",
        "64",
        "--lr",
        "0.01",
        "--device",
        "cpu",
        "--checkpoint-seconds",
        "0",  # a checkpoint after every epoch, so kills land between checkpoints
    ]
    run(["distill", store, *args, "--out", str(tmp / "whole")])
    out = tmp / "cut"

    def command() -> list[str]:
        resume = ["--resume"] if checkpoint_epochs(out) else []
        return ["distill", store, *args, "--out", str(out), *resume]

    killed = killed_runs(command, lambda: (out / DISTILL_SUMMARY).exists(), kills, rng, (2.5, 6.0))
    whole, cut = load_file(str(tmp / "whole" / STUDENT_WEIGHTS)), load_file(str(out / STUDENT_WEIGHTS))
    assert whole.keys() == cut.keys() and all(np.array_equal(whole[k].numpy(), cut[k].numpy()) for k in whole)
    return killed, sum(v.numel() * v.element_size() for v in whole.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        killed_t, compared_t = soak_teach(tmp, args.kills, rng)
        print(f"teach: {killed_t} SIGKILLs survived, {compared_t / 2**10:.0f} KiB of weights byte-identical")
        killed, compared = soak_extract(tmp, str(tmp / "teacher" / TEACHER_WEIGHTS), args.kills, rng)
        print(f"extract: {killed} SIGKILLs survived, {compared / 2**20:.1f} MiB byte-identical to an uninterrupted run")
        killed_d, compared_d = soak_distill(tmp, args.kills, rng)
        print(f"distill: {killed_d} SIGKILLs survived, {compared_d / 2**10:.0f} KiB of weights identical")
    print(f"soak: {killed_t + killed + killed_d} kills survived, results identical")


if __name__ == "__main__":
    main()
