"""Fixtures: digits teachers trained once per session (a one-epoch one for mechanics, a good one for the slow
end-to-end tests) and a small scored store. Helpers shared by the test modules are in helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from helpers import Disk, small_chunks  # noqa: E402
from pipeline import ExtractConfig, ScoreConfig, TeachConfig, extract, score, teach  # noqa: E402

TRAINED_EPOCHS = 8


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The default teacher (resnet20) after one epoch on digits: real weights for every stage's mechanics, in a
    few seconds. Returns teach's summary."""
    out = tmp_path_factory.mktemp("teacher")
    return teach(TeachConfig(out=str(out), epochs=1, device="cpu"))


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory):
    """The default teacher trained for 8 epochs, for the slow tests that need a good one."""
    out = tmp_path_factory.mktemp("trained_teacher")
    return teach(TeachConfig(out=str(out), epochs=TRAINED_EPOCHS, device="cpu"))


@pytest.fixture(scope="session")
def scored_store(digits_teacher, tmp_path_factory):
    """400 cached train samples of two teacher taps (several blocks), scored: top-2 are both taps."""
    out = tmp_path_factory.mktemp("distill_store")
    with small_chunks():
        extract(
            ExtractConfig(
                out=str(out),
                checkpoint=digits_teacher["checkpoint"],
                layers=("layer2.2", "layer3.2"),
                max_samples=400,
                device="cpu",
            )
        )
    score(ScoreConfig(store=str(out), top_k=2, plot=False))
    return out


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """A 16 MiB disk to fill or make read-only (`helpers.Disk`)."""
    small = Disk(tmp_path / "disk", monkeypatch)
    yield small
    small.close()
