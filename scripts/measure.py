"""The one measurement behind the times and example outputs that README.md and docs/*.md quote.

    python scripts/measure.py [--skip STEP ...] [--docs-root DIR]   # make measure: all four steps, 20+ minutes

From a clean demo (runs/digits removed, and nothing else) it runs `make demo`, `make docs-check`, `make test-fast`
and `make test`, each its own process, and records per step the wall seconds, the CPU seconds of every process the
step ran (user + system, from getrusage(RUSAGE_CHILDREN): load from other jobs stretches wall seconds far more than
these), the 1-minute load average before, after and averaged over the step, and the counts of pytest's (or
docs-check's) last line. The machine is recorded with them: CPU model, cores, memory, Python and torch versions.
Each step's output goes to runs/measure/STEP.log. It writes

- docs/measured.json: every figure, for machines;
- docs/measured.md: a generated page with the machine, the load and a table of the steps;
- in README.md and docs/*.md, the lines between `<!-- measured:NAME -->` and `<!-- /measured:NAME -->` (each marker
  alone on its line), replaced by the output NAME of OUTPUTS: `demo-summary`, `kdpipe summary runs/digits` in a
  fence, `score-table`, the demo store's Q table as `kdpipe score` prints it, and `times`, the steps' table and the
  machine in a line. A new output is a function of the measurement
  and a line in OUTPUTS.

Markers are checked before anything is measured: one naming no output, or unclosed, stops the run naming file:line.
When a step fails, the record is still written but the docs' regions are left as they were, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "runs" / "digits"
LOGS = ROOT / "runs" / "measure"
KDPIPE = str(Path(sys.executable).parent / "kdpipe")
STEPS = {name: ["make", name] for name in ("demo", "docs-check", "test-fast", "test")}
LOAD_SAMPLE_SECONDS = 5
COUNT = re.compile(r"\b(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|run)\b")
MARKER = re.compile(r"^\s*<!-- (?P<close>/?)measured:(?P<name>[\w.-]+) -->\s*$")
RECORD = Path("docs") / "measured"  # .md and .json, under the docs root


def machine() -> dict:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": models[0] if models else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "system": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
    }


def commit() -> str:
    """The checked-out commit, and whether the working tree differs from it (other engineers' edits count)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + (" with uncommitted changes" if status.stdout.strip() else "")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def counts(output: str) -> dict[str, int]:
    """The counts of the last summary line in `output` (pytest's `3 passed, 1 skipped in 2.1s`, docs-check's)."""
    for line in reversed(output.splitlines()):
        found = COUNT.findall(line)
        if found:
            return {word: int(number) for number, word in found}
    return {}


def run_step(command: Sequence[str], log: Path) -> dict:
    """Runs one step, its output to `log`: wall and CPU seconds, load average, exit code and counts."""
    log.parent.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    start, cpu_start = time.perf_counter(), children_cpu_seconds()
    with log.open("w") as out:
        process = subprocess.Popen(list(command), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while True:  # sample the load while the step runs, for its average over the step
            try:
                process.wait(timeout=LOAD_SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                loads.append(os.getloadavg()[0])
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_start
    loads.append(os.getloadavg()[0])
    return {
        "command": " ".join(command),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_before": round(loads[0], 2),
        "load_mean": round(sum(loads) / len(loads), 2),
        "load_after": round(loads[-1], 2),
        "exit_code": process.returncode,
        "counts": counts(log.read_text(errors="replace")),
    }


def result(step: dict) -> str:
    """A step's outcome in words: its counts, or ok; failed with its exit code."""
    text = ", ".join(f"{number} {word}" for word, number in step["counts"].items()) or "ok"
    return text if step["exit_code"] == 0 else f"failed (exit {step['exit_code']}): {text}"


def measure(steps: Sequence[str]) -> dict:
    """The machine, then each step in turn, from a clean demo when the demo is one of them."""
    if "demo" in steps:
        print(f"removing {DEMO.relative_to(ROOT)}, so the demo is measured from scratch", flush=True)
        if DEMO.exists():
            shutil.rmtree(DEMO)  # only the demo's folder: rmtree refuses a link, so nothing outside runs/ goes
    measurement = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "steps": {},
    }
    for name in steps:
        log = LOGS / f"{name}.log"
        print(f"{name}: {' '.join(STEPS[name])} (output in {os.path.relpath(log, ROOT)})", flush=True)
        step = measurement["steps"][name] = run_step(STEPS[name], log)
        print(f"{name}: {step['wall_s']:.0f} s wall, {step['cpu_s']:.0f} s CPU, {result(step)}", flush=True)
    return measurement


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def machine_line(measurement: dict) -> str:
    """The machine and its load in one line: what a reader needs to weigh the seconds."""
    m, loads = measurement["machine"], [s["load_mean"] for s in measurement["steps"].values()]
    load = f"load average {min(loads):.1f}–{max(loads):.1f} over the steps" if loads else "no step measured"
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {load}; Python {m['python']}, torch {m['torch']}; "
        f"{measurement['generated'][:10]}, `make measure`"
    )


def demo_summary(measurement: dict) -> str:
    """`kdpipe summary runs/digits` as `make demo` ends with it."""
    summary = subprocess.run(
        [KDPIPE, "summary", str(DEMO.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return f"```\n{summary.stdout.rstrip()}\n```"


def score_table(measurement: dict) -> str:
    """The Q table `kdpipe score` printed for the demo's store, from its scores.json."""
    from pipeline.stages.score import format_table  # imports torch: only when this output is asked for

    scores = json.loads((DEMO / "extract" / "scores.json").read_text())
    return f"```\n{format_table(scores)}\n```"


def times(measurement: dict) -> str:
    """The steps' wall and CPU seconds, and the machine under them."""
    rows = ["| step | wall | CPU s |", "|---|---|---|"]
    rows += [
        f"| `make {name}` | {duration(s['wall_s'])} | {s['cpu_s']:.0f} |" for name, s in measurement["steps"].items()
    ]
    return "\n".join([*rows, "", machine_line(measurement)])


OUTPUTS: dict[str, Callable[[dict], str]] = {
    "demo-summary": demo_summary,
    "score-table": score_table,
    "times": times,
}


@dataclass(frozen=True)
class Region:
    """Lines `start` and `end` (0-based) hold the markers of output `name`; what lies between is regenerated."""

    name: str
    start: int
    end: int


def regions(text: str, file: str) -> list[Region]:
    """The marked regions of a text; ValueError naming file:line for a marker naming no output, a region opened
    inside another, a closing marker that closes nothing, or a region never closed."""
    found, opened = [], None
    for index, line in enumerate(text.split("\n")):
        marker = MARKER.match(line)
        if marker is None:
            continue
        name, where = marker["name"], f"{file}:{index + 1}"
        if name not in OUTPUTS:
            raise ValueError(f"{where}: no output is named {name!r} (scripts/measure.py OUTPUTS: {', '.join(OUTPUTS)})")
        if not marker["close"]:
            if opened is not None:
                raise ValueError(f"{where}: a region opens inside {opened.name}'s, open since line {opened.start + 1}")
            opened = Region(name, index, -1)
        elif opened is None or opened.name != name:
            raise ValueError(f"{where}: <!-- /measured:{name} --> closes no open region of that name")
        else:
            found.append(Region(name, opened.start, index))
            opened = None
    if opened is not None:
        raise ValueError(f"{file}:{opened.start + 1}: <!-- measured:{opened.name} --> is never closed")
    return found


def regenerated(text: str, found: list[Region], outputs: dict[str, str]) -> str:
    """`text` with the lines between each region's markers replaced by its output."""
    lines = text.split("\n")
    for region in reversed(found):  # from the end, so the earlier regions' line numbers still hold
        lines[region.start + 1 : region.end] = outputs[region.name].split("\n")
    return "\n".join(lines)


def doc_files(docs_root: Path) -> list[Path]:
    return [path for path in [docs_root / "README.md", *sorted((docs_root / "docs").glob("*.md"))] if path.is_file()]


def marked(docs_root: Path) -> dict[Path, list[Region]]:
    """Each doc file's regions; exits naming every marker problem."""
    found, problems = {}, []
    for path in doc_files(docs_root):
        try:
            found[path] = regions(path.read_text(encoding="utf-8"), str(path.relative_to(docs_root)))
        except ValueError as err:
            problems.append(f"Error: {err}")
    if problems:
        sys.exit("\n".join(problems))
    return found


def record_page(measurement: dict, where: list[str]) -> str:
    """docs/measured.md: the machine, the load and the steps, and the regions these figures were written into."""
    m = measurement["machine"]
    lines = [
        "# Measured figures",
        "",
        f"Generated by `make measure` (scripts/measure.py) at {measurement['generated']}, commit "
        f"{measurement['commit']}; do not edit, run it again. The same figures are in measured.json.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB of memory, {m['system']}; Python "
        f"{m['python']}, torch {m['torch']}.",
        "",
        "Wall seconds are what a step took on this machine as loaded; CPU seconds are the user and system time of "
        "every process it ran, which other jobs inflate far less. The load is the 1-minute load average.",
        "",
        "| step | wall s | CPU s | load before / mean / after | result |",
        "|---|---|---|---|---|",
    ]
    for name, s in measurement["steps"].items():
        load = f"{s['load_before']:.2f} / {s['load_mean']:.2f} / {s['load_after']:.2f}"
        lines.append(f"| `make {name}` | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {load} | {result(s)} |")
    regenerated_in = ", ".join(where) if where else "none (a step failed, or no file has markers)"
    return "\n".join([*lines, "", f"Regions regenerated from this run: {regenerated_in}.", ""])


def write_docs(measurement: dict, docs_root: Path, regenerate: bool) -> None:
    """The record, and, when `regenerate`, every marked region from the docs' current text (they may have been
    edited while the steps ran)."""
    where = []
    if regenerate:
        found = marked(docs_root)
        names = {region.name for file_regions in found.values() for region in file_regions}
        outputs = {name: OUTPUTS[name](measurement) for name in sorted(names)}
        for path, file_regions in found.items():
            if file_regions:
                text = regenerated(path.read_text(encoding="utf-8"), file_regions, outputs)
                path.write_text(text, encoding="utf-8")
                name = str(path.relative_to(docs_root))
                where += [f"{name}:{r.start + 1} ({r.name})" for r in regions(text, name)]  # the lines as written
    record = docs_root / RECORD
    record.with_suffix(".json").write_text(json.dumps(measurement, indent=1) + "\n")
    record.with_suffix(".md").write_text(record_page(measurement, where))
    print(f"wrote {record}.md and .json; regions: {', '.join(where) or 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[], choices=list(STEPS), help="Leave a step out.")
    parser.add_argument("--docs-root", type=Path, default=ROOT, help="Where README.md and docs/ are rewritten.")
    args = parser.parse_args(argv)
    marked(args.docs_root)  # before 20 minutes of measuring, not after
    measurement = measure([name for name in STEPS if name not in args.skip])
    failed = [name for name, step in measurement["steps"].items() if step["exit_code"]]
    write_docs(measurement, args.docs_root, regenerate=not failed)
    if failed:
        print(f"Error: {', '.join(failed)} failed (runs/measure/*.log); the docs' regions were left as they were")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
