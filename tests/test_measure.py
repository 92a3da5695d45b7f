"""scripts/measure.py without its make targets: the marked regions, the outputs' registry, a step's figures."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import load_script

measure = load_script("measure")

DOC = """# Doc

<!-- measured:times -->
old table
<!-- /measured:times -->

Prose kept, `<!-- measured:inline -->` in a sentence is no marker.

  <!-- measured:greeting -->
  <!-- /measured:greeting -->
"""

STEP = {
    "command": "make demo",
    "wall_s": 125.0,
    "cpu_s": 210.4,
    "load_before": 1.0,
    "load_mean": 2.5,
    "load_after": 3.0,
    "exit_code": 0,
    "counts": {},
}
MEASUREMENT = {
    "generated": "2026-12-08T10:00:00+00:00",
    "commit": "abc1234",
    "machine": {
        "cpu": "AMD EPYC",
        "cores": 2,
        "memory_gib": 7.8,
        "system": "Linux",
        "python": "3.11.7",
        "torch": "2.5",
    },
    "steps": {"demo": STEP, "test": {**STEP, "wall_s": 40.0, "load_mean": 4.0, "counts": {"passed": 3}}},
}


@pytest.fixture
def greeting(monkeypatch):
    """An output added as the docstring says: one function and one line in OUTPUTS."""
    monkeypatch.setitem(measure.OUTPUTS, "greeting", lambda measurement: f"hello\nfrom {measurement['commit']}")


def test_regions_are_replaced_between_their_markers(greeting):
    found = measure.regions(DOC, "doc.md")
    assert [(r.name, r.start + 1, r.end + 1) for r in found] == [("times", 3, 5), ("greeting", 9, 10)]
    outputs = {"times": "new\ntable", "greeting": "hello"}
    text = measure.regenerated(DOC, found, outputs)
    assert "<!-- measured:times -->\nnew\ntable\n<!-- /measured:times -->" in text
    assert "  <!-- measured:greeting -->\nhello\n  <!-- /measured:greeting -->" in text
    assert "old table" not in text and "Prose kept" in text
    again = measure.regions(text, "doc.md")
    assert measure.regenerated(text, again, outputs) == text  # a second run changes nothing


@pytest.mark.parametrize(
    "text, error",
    [
        ("a\n<!-- measured:nothing -->\n<!-- /measured:nothing -->\n", "doc.md:2: no output is named 'nothing'"),
        ("<!-- measured:times -->\n", "doc.md:1: <!-- measured:times --> is never closed"),
        ("<!-- /measured:times -->\n", "doc.md:1: <!-- /measured:times --> closes no open region"),
        (
            "<!-- measured:times -->\n<!-- measured:demo-summary -->\n",
            "doc.md:2: a region opens inside times's, open since line 1",
        ),
    ],
)
def test_marker_problems_name_file_and_line(text, error):
    with pytest.raises(ValueError, match=error):
        measure.regions(text, "doc.md")


def test_every_marker_problem_stops_the_run_before_measuring(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- measured:nothing -->\n<!-- /measured:nothing -->\n")
    (tmp_path / "docs" / "a.md").write_text("\n<!-- measured:times -->\n")
    with pytest.raises(SystemExit) as stopped:
        measure.main(["--docs-root", str(tmp_path), "--skip", "demo"])
    assert "Error: README.md:1: no output is named 'nothing'" in str(stopped.value)
    assert "Error: docs/a.md:2: <!-- measured:times --> is never closed" in str(stopped.value)


def test_times_lists_the_steps_and_the_machine():
    lines = measure.times(MEASUREMENT).splitlines()
    assert lines[2:4] == ["| `make demo` | 2 min 5 s | 210 |", "| `make test` | 40 s | 210 |"]
    assert lines[-1].startswith("AMD EPYC, 2 cores, 7.8 GiB; load average 2.5–4.0 over the steps;")


def test_counts_come_from_the_last_summary_line():
    pytest_output = (
        "collected\n2 failed, 250 passed, 3 skipped, 1 warning in 99.1s\nmake: *** [Makefile:1: test] Error 1\n"
    )
    assert measure.counts(pytest_output) == {"failed": 2, "passed": 250, "skipped": 3}
    docs_check = "README.md:3: bash ok\ndocs-check: 12 run, 4 skipped (needs), 0 failed; 80.0 s wall, 90.1 s CPU\n"
    assert measure.counts(docs_check) == {"run": 12, "skipped": 4, "failed": 0}
    assert measure.counts("teacher resnet20 test top-1 99.72%\n") == {}


def test_a_step_is_timed_with_its_children_cpu(tmp_path):
    busy = (
        "import time; end = time.process_time() + 0.3\nwhile time.process_time() < end: pass\nprint('1 passed in 0.3s')"
    )
    step = measure.run_step([sys.executable, "-c", busy], tmp_path / "step.log")
    assert step["exit_code"] == 0 and step["counts"] == {"passed": 1}
    assert step["cpu_s"] >= 0.3 and step["wall_s"] >= 0.3
    assert step["load_before"] >= 0 and step["load_after"] >= 0


def test_measured_steps_write_the_record_and_the_regions(tmp_path, monkeypatch, greeting):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(DOC)
    monkeypatch.setattr(measure, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(measure, "STEPS", {"ok": [sys.executable, "-c", "print('2 passed in 0.1s')"]})
    assert measure.main(["--docs-root", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "docs" / "measured.json").read_text())
    assert record["steps"]["ok"]["counts"] == {"passed": 2} and record["machine"]["cores"] >= 1
    readme = (tmp_path / "README.md").read_text()
    assert "| `make ok` |" in readme and f"hello\nfrom {record['commit']}" in readme
    page = (tmp_path / "docs" / "measured.md").read_text()
    assert page.startswith("# Measured figures\n\nGenerated by `make measure`")
    assert "| `make ok` |" in page and "2 passed" in page and "README.md:3 (times), README.md:13 (greeting)" in page


def test_a_failed_step_is_recorded_and_the_regions_left_alone(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- measured:times -->\nold\n<!-- /measured:times -->\n")
    monkeypatch.setattr(measure, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(measure, "STEPS", {"broken": [sys.executable, "-c", "raise SystemExit(3)"]})
    assert measure.main(["--docs-root", str(tmp_path)]) == 1
    assert (tmp_path / "README.md").read_text() == "<!-- measured:times -->\nold\n<!-- /measured:times -->\n"
    assert "failed (exit 3)" in (tmp_path / "docs" / "measured.md").read_text()
