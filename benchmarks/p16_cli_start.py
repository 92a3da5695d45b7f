"""P16: what `kdpipe --help` costs to start, against the eager imports it used to make and a bare `import torch`.

Each variant runs as its own process, `--repeats` times, interleaved so that the machine's load falls on all of them
alike; each process's wall seconds, CPU seconds (user + system) and peak RSS come from `os.wait4`, its own rusage
(RUSAGE_CHILDREN's peak RSS would be the largest child's so far, not this one's). The medians are printed.

- now: the installed `kdpipe --help`.
- eager: the same help after importing everything `pipeline/__init__.py` imported before it became lazy (every
  stage, so torch, torchvision, timm and dask), as every `kdpipe` call did.
- torch: `python -c "import torch"`, the floor of any path that imports torch.
- bare: `python -c pass`, the interpreter's own start, the floor of any command.

    python benchmarks/p16_cli_start.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pipeline

KDPIPE = str(Path(sys.executable).parent / "kdpipe")
EAGER = f"from pipeline import {', '.join(pipeline.__all__)}\nfrom pipeline.cli import main\nmain()"
VARIANTS = {
    "now": [KDPIPE, "--help"],
    "eager": [sys.executable, "-c", EAGER, "--help"],
    "torch": [sys.executable, "-c", "import torch"],
    "bare": [sys.executable, "-c", "pass"],
}


def measure(command: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one run of `command`, which must succeed."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if child.returncode:
        sys.exit(f"{' '.join(command)} failed ({child.returncode})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, command in VARIANTS.items():
            runs[name].append(measure(command))
    medians = {name: [statistics.median(column) for column in zip(*found, strict=True)] for name, found in runs.items()}
    for name, (wall, cpu, rss) in medians.items():
        print(f"{name:6s} {wall:6.2f} s wall  {cpu:6.2f} s CPU  {rss:6.0f} MiB peak RSS")
    (wall, cpu, rss), (eager_wall, eager_cpu, eager_rss) = medians["now"], medians["eager"]
    bare_wall, bare_cpu, _ = medians["bare"]
    print(
        f"P16 kdpipe --help, eager imports / now (median of {args.repeats}): wall {eager_wall / wall:.1f}x, "
        f"CPU {eager_cpu / cpu:.1f}x, RSS {eager_rss / rss:.1f}x; now / python -c pass: wall {wall / bare_wall:.1f}x, "
        f"CPU {cpu / bare_cpu:.1f}x"
    )


if __name__ == "__main__":
    main()
