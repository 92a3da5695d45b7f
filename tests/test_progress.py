"""Progress off a terminal: a log line at a bounded rate (a log file shows progress without a redrawn bar), the
plain tqdm bar on a terminal, nothing with --quiet."""

from __future__ import annotations

import io
import logging
import re

import pytest
from tqdm import tqdm

from pipeline.engine import runtime


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_file(monkeypatch, caplog):
    """stderr is not a terminal; the clock moves only when the test says so."""
    clock = FakeClock()
    monkeypatch.setattr(runtime, "_is_terminal", lambda file=None: False)
    monkeypatch.setattr(runtime.time, "monotonic", clock)
    monkeypatch.setattr(logging.getLogger("pipeline"), "level", logging.INFO)
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    return clock, caplog


def _counts(caplog) -> list[int]:
    return [int(re.search(r"(\d+)/100", r.getMessage()).group(1)) for r in caplog.records]


def test_off_a_terminal_progress_is_logged_at_most_every_interval_and_at_the_end(log_file):
    clock, caplog = log_file
    bar = runtime.progress(total=100, desc="epoch 1", unit="batch")
    assert isinstance(bar, runtime.LoggedProgress)
    for step in range(100):
        clock.now += 1.0  # one second a step, and a postfix change (which redraws a tqdm bar) every step
        bar.update(1)
        bar.set_postfix(loss=step)
    bar.close()
    counts = _counts(caplog)
    seconds = runtime.LOGGED_PROGRESS_SECONDS
    assert counts[-1] == 100 and "epoch 1: 100%" in caplog.records[-1].getMessage()
    # every step was a second apart, so logged counts are at least the interval apart (the final one excepted)
    assert all(b - a >= seconds for a, b in zip(counts[:-2], counts[1:-1], strict=True)), counts
    assert len(counts) <= 100 / seconds + 2 and len(counts) >= 100 // seconds


def test_the_end_is_logged_once_and_a_transient_bar_leaves_nothing_at_its_close(log_file):
    clock, caplog = log_file
    for _ in runtime.progress(range(3), desc="short"):
        pass
    (message,) = _messages(caplog)
    assert message.startswith("short: 100%") and "3/3" in message
    caplog.clear()
    for _ in runtime.progress(range(3), desc="check", leave=False):
        pass
    assert _messages(caplog) == []


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_terminal_gets_the_bar_a_log_file_the_lines_and_quiet_nothing(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(logging.getLogger("pipeline"), "level", logging.INFO)
    bar = runtime.progress(range(2), file=Terminal())
    assert type(bar) is tqdm and not bar.disable
    assert isinstance(runtime.progress(range(2), file=io.StringIO()), runtime.LoggedProgress)  # a log file
    monkeypatch.setattr(logging.getLogger("pipeline"), "level", logging.WARNING)  # kdpipe --quiet
    assert runtime.progress(range(2), file=Terminal()).disable
