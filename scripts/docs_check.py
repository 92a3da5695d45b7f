"""Runs the shell and Python snippets of README.md and docs/*.md, so what the docs tell a reader to type works.

    python scripts/docs_check.py [--list] [--only FILE[:LINE]] [--timeout S] [--root DIR] [FILE ...]

Every fenced code block is found in file order, README.md first, then docs/*.md sorted. The first word of a fence's
info string is its language: ```bash, ```sh and ```shell blocks run as one `bash -euo pipefail` script each, ```python
blocks with `python`, both from the repository root with this interpreter's bin folder first on PATH (so `kdpipe` and
`python` are the virtualenv's, as for a reader who activated it) and HF_HUB_OFFLINE=1. Other fences (text, yaml,
console transcripts, none) are output or configuration and are not run.

A block whose first line is `# needs: <what>` (`# needs: a CUDA GPU`, `# needs: ~20 min on 2 cores`) is not run: it
is listed as skipped with that reason, which the reader sees too. A runnable block with a line starting with `$ ` (a
prompt) is refused: the docs' commands must paste into a shell as they are. Transcripts go in ```console fences.

Blocks of one file run in order, so a later block may use what an earlier one made. The docs write what they make
under runs/tour/ (the demo's runs/digits is only read), and the check clears that folder before it runs any block,
so a second check meets what a reader meets the first time. A failed block is reported with
its file and line and the last lines of its output; the remaining blocks still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path("runs", "tour")  # where the docs' snippets write, relative to the root; cleared before a check
SHELLS = {"bash", "sh", "shell"}
RUNNERS = {"bash": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"]}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
NEEDS = re.compile(r"^#\s*needs:\s*(?P<what>.+?)\s*$")
PROMPT = "$ "
TAIL_LINES = 30


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is (its opening fence's line and its closing one), its language and code."""

    file: str
    line: int
    end_line: int
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def runner(self) -> str | None:
        """ "bash" or "python" for the blocks this script runs, None for output and configuration."""
        language = "bash" if self.language in SHELLS else self.language
        return language if language in RUNNERS else None

    @property
    def needs(self) -> str | None:
        """What the block needs that CI does not have, from its `# needs:` first line."""
        first = self.code.split("\n", 1)[0]
        match = NEEDS.match(first.strip())
        return match["what"] if match else None

    @property
    def prompt_line(self) -> int | None:
        """The file line of the block's first line starting with a prompt, if any."""
        for number, text in enumerate(self.code.split("\n"), start=self.line + 1):
            if text.startswith(PROMPT):
                return number
        return None

    def verdict(self) -> tuple[str, str]:
        """What the check does with the block ("run", "skip", "refuse" or "ignore") and how to say it."""
        if self.runner is None:
            return "ignore", f"not run ({self.language or 'no language'})"
        if self.prompt_line is not None:
            return "refuse", f"refused: line {self.prompt_line} starts with a prompt ({PROMPT!r})"
        if self.needs is not None:
            return "skip", f"skipped, needs: {self.needs}"
        return "run", "run"


def dedent(line: str, indent: int) -> str:
    """A code line less up to `indent` leading spaces: a fence indented in a list item indents its code as much."""
    return line[min(indent, len(line) - len(line.lstrip())) :]


def fenced_blocks(text: str, file: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order. A fence closes on a line of at least as many of its own
    characters and nothing else (CommonMark); an unclosed fence runs to the end of the text, as renderers show it."""
    blocks = []
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((i for i in range(index + 1, len(lines)) if closing.match(lines[i])), len(lines))
        code = "\n".join(dedent(line, indent) for line in lines[index + 1 : end])
        words = opening["info"].split()
        language = words[0].lower() if words else ""
        blocks.append(Block(file=file, line=index + 1, end_line=end + 1, language=language, code=code))
        index = end + 1
    return blocks


def doc_files(root: Path) -> list[Path]:
    """README.md, then docs/*.md sorted: the order the checks run in."""
    return [path for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if path.is_file()]


def collect(root: Path, files: Sequence[Path]) -> list[Block]:
    """Every block of `files`, each named by its path relative to `root` where it lies under it."""
    blocks = []
    for path in files:
        name = str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)
        blocks += fenced_blocks(path.read_text(encoding="utf-8"), name)
    return blocks


def selected(blocks: list[Block], only: Sequence[str]) -> list[Block]:
    """The blocks `--only FILE[:LINE]` names: all of FILE's, or the one whose fences enclose LINE."""
    if not only:
        return blocks
    chosen = []
    for block in blocks:
        for wanted in only:
            file, _, line = wanted.partition(":")
            in_file = Path(block.file) == Path(file)
            if in_file and (not line or block.line <= int(line) <= block.end_line):
                chosen.append(block)
                break
    return chosen


def block_env() -> dict[str, str]:
    """The environment blocks run in: this interpreter's bin folder first on PATH (sys.executable unresolved: a
    virtualenv's python is a link into its own bin), and no downloads from the Hugging Face hub."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1"}


def run_block(block: Block, root: Path, timeout: float) -> tuple[str | None, str]:
    """Runs a block from `root`; its failure (None when it passed) and its output, stdout and stderr together."""
    command = [*RUNNERS[block.runner], block.code]
    # Its own session, so a timeout kills what the block started too, not only the shell.
    process = subprocess.Popen(
        command,
        cwd=root,
        env=block_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return f"timed out after {timeout:g} s", output
    failure = f"failed (exit {process.returncode})" if process.returncode else None
    return failure, output


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check(blocks: Iterable[Block], root: Path, timeout: float) -> int:
    """Runs the runnable blocks in order, reporting each; prints the summary and returns the number of failures."""
    ran = skipped = failed = 0
    start, cpu_start = time.perf_counter(), cpu_seconds_of_children()
    for block in blocks:
        action, verdict = block.verdict()
        if action == "refuse":
            print(f"Error: {block.where}: the {block.runner} block is {verdict}; drop the prompt so it pastes "
                  "into a shell, or use a ```console fence for a transcript", file=sys.stderr, flush=True)  # fmt: skip
            failed += 1
        elif action == "skip":
            print(f"{block.where}: {verdict}", flush=True)
            skipped += 1
        elif action == "run":
            block_start = time.perf_counter()
            failure, output = run_block(block, root, timeout)
            ran += 1
            seconds = time.perf_counter() - block_start
            if failure:
                failed += 1
                tail = "\n".join(output.rstrip("\n").split("\n")[-TAIL_LINES:])
                print(f"Error: {block.where}: the {block.runner} block {failure} after {seconds:.1f} s; its last "
                      f"{TAIL_LINES} lines of output:\n{tail}", file=sys.stderr, flush=True)  # fmt: skip
            else:
                print(f"{block.where}: {block.runner} ok ({seconds:.1f} s)", flush=True)
    wall, cpu = time.perf_counter() - start, cpu_seconds_of_children() - cpu_start
    print(f"docs-check: {ran} run, {skipped} skipped (needs), {failed} failed; {wall:.1f} s wall, {cpu:.1f} s CPU")
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md, then docs/*.md).")
    parser.add_argument("--root", type=Path, default=ROOT, help="Where blocks run and files are found.")
    parser.add_argument("--list", action="store_true", help="Print each block and what the check does with it.")
    parser.add_argument("--only", action="append", default=[], metavar="FILE[:LINE]", help="Check only these blocks.")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds a block may run (default 600).")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = [path if path.is_absolute() else root / path for path in args.files] or doc_files(root)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        sys.exit(f"Error: no such file: {', '.join(missing)}")
    blocks = selected(collect(root, files), args.only)
    if args.only and not blocks:
        sys.exit(f"Error: --only {' '.join(args.only)} names no block")
    if args.list:
        for block in blocks:
            print(f"{block.where}\t{block.language or '-'}\t{block.verdict()[1]}")
        return 0
    shutil.rmtree(root / SCRATCH, ignore_errors=True)
    return 1 if check(blocks, root, args.timeout) else 0


if __name__ == "__main__":
    sys.exit(main())
