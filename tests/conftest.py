"""Shared fixtures: a digits teacher trained once per session, and a helper to run the CLI in-process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.teach import teach

TEACH_EPOCHS = 8


def run_cli(*args: str, expect_ok: bool = True):
    """Runs `kdpipe ARGS` in-process; asserts success (or failure) and returns the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, f"kdpipe {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
    else:
        assert result.exit_code != 0, f"kdpipe {' '.join(map(str, args))} should have failed:\n{result.output}"
    return result


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The default teacher (resnet20) trained on digits with a short schedule; returns teach's summary."""
    out = tmp_path_factory.mktemp("teacher")
    return teach("resnet20", "digits", str(out), epochs=TEACH_EPOCHS, seed=0, device="cpu")
