"""Crash-safety soak: SIGKILL `kdpipe teach`, `kdpipe extract` and `kdpipe distill` at random moments, resume, and
check the result is byte-identical to an uninterrupted run.

    python scripts/soak.py --kills 10 [--seed 0]      # prints kills survived, where they landed, bytes compared

The extract soak writes a multi-view store (three views of each training image, two of them augmented, and a plain
test split), and the distill soak trains on it, drawing a view per row per epoch. Their kills are placed by progress,
not by the clock: an uninterrupted run first records when each unit of work was committed (a block of a view flagged
written, an epoch's checkpoint), then each kill picks a unit still to do, waits for the killed run to commit the one
before it and strikes at a random moment of the time that unit took. So kills land inside the work whatever the
machine's speed; the first extract kill lands in a block of an augmented view, the first distill kill in an epoch
after the first and before the last (so --resume has epochs left to train).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, here as in every kdpipe the soak starts (ENV below)

from cache.schema import PROGRESS, VIEWS  # noqa: E402
from cache.store import UNFINISHED_WRITE  # noqa: E402
from pipeline.layout import (  # noqa: E402
    DISTILL_SUMMARY,
    EXTRACT_SUMMARY,
    STORE_NAME,
    STUDENT_WEIGHTS,
    TEACH_SUMMARY,
    TEACHER_WEIGHTS,
    checkpoint_epochs,
)

# The kdpipe command (its name sets extract's OpenMP wait policy, pipeline/__init__.py) running this checkout's code,
# which PYTHONPATH puts before an installed kdpipe's (an editable install may point at another worktree).
KDPIPE = [str(Path(sys.executable).parent / "kdpipe")]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
POLL_SECONDS = 0.01


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
        elif process.returncode:  # failed unkilled: rerun it for its error (a pass then is a failure still)
            run(args := make_args())
            raise RuntimeError(f"kdpipe {' '.join(args)} failed ({process.returncode}), then passed when rerun")
        process.wait()
    if not done():
        run(make_args())
    return killed


def timeline(args: list[str], units: Callable[[], int]) -> list[float]:
    """Runs `kdpipe ARGS` uninterrupted, watching `units()` (the units of work it has committed); returns the
    seconds from its start at which it had committed 1, 2, ... n units, and last the second it exited."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process, times = popen(args, stderr), []
        while True:
            exited = process.poll() is not None
            times += [time.perf_counter() - start] * (units() - len(times))
            if exited:
                break
            time.sleep(POLL_SECONDS)
        if process.returncode:
            stderr.seek(0)
            tail = stderr.read()[-4000:].decode(errors="replace")
            raise RuntimeError(f"kdpipe {' '.join(args)} failed ({process.returncode}):\n{tail}")
    return [*times, time.perf_counter() - start]


def placed_kills(
    make_args: Callable[[], list[str]],
    done: Callable[[], bool],
    units: Callable[[], int],
    times: list[float],
    kills: int,
    rng: random.Random,
    where: Callable[[float], object],
    first: list[int] | None = None,
) -> list:
    """SIGKILLs `make_args()` `kills` times, each inside a unit of work it still has to do, then runs it to
    completion; returns `where(start)` of each kill (what the killed run had written since `start`).

    `times` is the uninterrupted run's `timeline`: unit u (0-based) took from times[u-1] to times[u], the last entry
    being the work after the last unit. A kill picks unit u among those left (the first kill among `first`, when
    given), waits for the run to commit unit u-1 and strikes a random part of unit u's time later, or at once should
    the run commit unit u first (it may go faster than the uninterrupted one did); a kill of the first unit a run does
    strikes anywhere in its start-up and that unit."""
    landed = []
    while len(landed) < kills and not done():
        committed = units()
        chosen = [u for u in first or [] if u >= committed] if not landed else []
        unit = rng.choice(chosen) if chosen else rng.randint(committed, len(times) - 1)
        wall, process = time.time(), popen(make_args())
        if unit == committed:  # start-up (opening the store or checkpoint) and the unit itself
            delay = rng.uniform(0, times[0] if unit == 0 else times[0] + times[unit] - times[unit - 1])
        else:
            while units() < unit and process.poll() is None:
                time.sleep(POLL_SECONDS)
            delay = rng.uniform(0, times[unit] - times[unit - 1])
        strike = time.perf_counter() + delay
        while time.perf_counter() < strike and units() <= unit and process.poll() is None:
            time.sleep(POLL_SECONDS)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            landed.append(where(wall))
        elif process.returncode:  # failed unkilled: rerun it for its error (a pass then is a failure still)
            run(args := make_args())
            raise RuntimeError(f"kdpipe {' '.join(args)} failed ({process.returncode}), then passed when rerun")
    if not done():
        run(make_args())
    return landed


def block_flags(store: Path) -> list[Path]:
    """The block flags written so far, of every view of every split (a flag's chunk file exists once its block is
    marked done; zarr writes each file whole, under a temporary name first)."""
    flags = [*store.glob(f"*/{PROGRESS}/c/*"), *store.glob(f"*/{VIEWS}/*/{PROGRESS}/c/*")]  # cheap to poll
    return [p for p in flags if not p.name.endswith(UNFINISHED_WRITE)]


@dataclass(frozen=True)
class Landing:
    """Where a kill of extract landed: in the block `block` of `group` (a split, or a view `split/views/<v>`), the
    first one, in the order an uninterrupted run flags them, still unflagged (None: every block was flagged, the run
    was completing the store). Unless `started` (the killed run had written a file), it may have been in its start-up
    still."""

    group: str | None
    block: int | None
    started: bool

    @property
    def in_augmented_view(self) -> bool:
        return self.started and self.group is not None and f"/{VIEWS}/" in self.group

    def __str__(self) -> str:
        where = "after the last block" if self.group is None else f"in {self.group} block {self.block}"
        return where + ("" if self.started else ", or in its start-up before it")


def extract_landing(out: Path, order: list[Path], since: float) -> Landing:
    """Where the extract into `out` started at `since` (wall clock) was when killed; `order` is the uninterrupted
    run's block flags (paths inside the store), in the order it wrote them."""
    store = out / STORE_NAME
    flagged = {p.relative_to(store) for p in block_flags(store)}
    pending = [flag for flag in order if flag not in flagged]
    started = any(p.stat().st_mtime >= since for p in out.rglob("*") if p.is_file())
    if not pending:
        return Landing(None, None, started)
    return Landing(pending[0].parent.parent.parent.as_posix(), int(pending[0].name), started)


def zarr_bytes_equal(first: Path, second: Path) -> int:
    """Asserts two stores hold the same arrays (every view's, block flags included) with identical bytes and the same
    attributes, in every group but the root (which records when and from where each was made), and that the second is
    complete; returns the bytes compared."""
    import zarr

    a, b = zarr.open_group(str(first), mode="r"), zarr.open_group(str(second), mode="r")
    left, right = dict(a.members(max_depth=None)), dict(b.members(max_depth=None))
    assert left.keys() == right.keys(), f"the stores' members differ: {sorted(left.keys() ^ right.keys())}"
    compared = 0
    for path, member in sorted(left.items()):
        other = right[path]
        assert dict(member.attrs) == dict(other.attrs), f"{path}: attributes differ"
        if isinstance(member, zarr.Array):
            assert isinstance(other, zarr.Array) and member.dtype == other.dtype, f"{path}: not the same array"
            values, others = member[:], other[:]
            assert values.shape == others.shape and values.tobytes() == others.tobytes(), f"{path} differs"
            compared += values.nbytes
    assert b.attrs["kdpipe"]["complete"]
    parts = [g for g in right.values() if isinstance(g, zarr.Group) and "arrays" in g.attrs]  # splits and views
    assert parts and all(g.attrs["complete"] for g in parts), "a split or view is not marked complete"
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


EXTRACT_VIEWS = 3  # of each training image: the plain image and two drawn by --augment crop


def soak_extract(tmp: Path, checkpoint: str, kills: int, rng: random.Random) -> tuple[list[Landing], int]:
    """Extracts a multi-view store (768 training images in EXTRACT_VIEWS views of three 256-row blocks each, the test
    split plain) into tmp/reference uninterrupted, then into tmp/killed under kills placed by its block flags, the
    first in an augmented view; returns where the kills landed and the bytes compared."""
    args = [
        "--teacher",
        "resnet20",
        "--checkpoint",
        checkpoint,
        "--splits",
        "train,test",
        "--layers",
        "layer1.2,layer2.2",
        "--views",
        str(EXTRACT_VIEWS),
        "--augment",
        "crop",
        "--max-samples",
        "768",  # three blocks of 256 rows per view
        "--batch-size",
        "32",
        "--device",
        "cpu",
    ]
    reference = tmp / "reference" / STORE_NAME
    times = timeline(["extract", *args, "--out", str(reference.parent)], lambda: len(block_flags(reference)))
    flags = sorted(block_flags(reference), key=lambda p: p.stat().st_mtime)  # in the order they were written
    order = [flag.relative_to(reference) for flag in flags]
    # The first kill in a block of an augmented view but the last one, so that even landing late (in the next block)
    # it lands in an augmented view.
    augmented = [u for u, flag in enumerate(order) if flag.parts[1] == VIEWS][:-1]
    out = tmp / "killed"
    store = out / STORE_NAME
    landed = placed_kills(
        lambda: ["extract", *args, "--out", str(out)],
        lambda: (out / EXTRACT_SUMMARY).exists(),  # written last, after completion
        lambda: len(block_flags(store)),
        times,
        kills,
        rng,
        lambda since: extract_landing(out, order, since),
        first=augmented,
    )
    return landed, zarr_bytes_equal(reference, store)


def soak_distill(tmp: Path, kills: int, rng: random.Random) -> tuple[list[int], int]:
    """Distills from soak_extract's multi-view store (every epoch each row under one of its views) uninterrupted, then
    under kills placed by its epoch checkpoints; returns the last checkpointed epoch at each kill and the bytes of
    weights compared."""
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
    out = tmp / "cut"

    def epochs_done() -> int:
        return max(checkpoint_epochs(out), default=0)

    def command() -> list[str]:
        resume = ["--resume"] if checkpoint_epochs(out) else []
        return ["distill", store, *args, "--out", str(out), *resume]

    whole = tmp / "whole"
    times = timeline(["distill", store, *args, "--out", str(whole)], lambda: max(checkpoint_epochs(whole), default=0))
    done = lambda: (out / DISTILL_SUMMARY).exists()  # noqa: E731
    # The first kill in an epoch between the first and the last (late, at the start of the next): --resume resumes
    # from a checkpoint with epochs left to train.
    mid_run = list(range(1, len(times) - 2))
    landed = placed_kills(command, done, epochs_done, times, kills, rng, lambda since: epochs_done(), mid_run)
    whole, cut = load_file(str(whole / STUDENT_WEIGHTS)), load_file(str(out / STUDENT_WEIGHTS))
    assert whole.keys() == cut.keys() and all(np.array_equal(whole[k].numpy(), cut[k].numpy()) for k in whole)
    return landed, sum(v.numel() * v.element_size() for v in whole.values())


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
        landed, compared = soak_extract(tmp, str(tmp / "teacher" / TEACHER_WEIGHTS), args.kills, rng)
        killed = len(landed)
        print(f"extract: {killed} SIGKILLs survived, {compared / 2**20:.1f} MiB byte-identical to an uninterrupted run")
        for landing in landed:
            print(f"  killed {landing}")
        epochs, compared_d = soak_distill(tmp, args.kills, rng)
        killed_d = len(epochs)
        print(f"distill: {killed_d} SIGKILLs survived, {compared_d / 2**10:.0f} KiB of weights identical")
        print(f"  killed after epoch checkpoints {', '.join(map(str, epochs))} (0: before the first)")
    print(f"soak: {killed_t + killed + killed_d} kills survived, results identical")


if __name__ == "__main__":
    main()
