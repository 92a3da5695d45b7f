"""Shared fixtures: a digits teacher trained once per session, and a helper to run the CLI in-process."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.teach import teach

TEACH_EPOCHS = 8


@contextlib.contextmanager
def small_chunks():
    """A context with 1 MiB chunks, so small test stores span several blocks (resume, streaming)."""
    import cache.store

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache.store, "MIN_CHUNK_BYTES", 1 << 20)
        yield


def run_cli(*args: str, expect_ok: bool = True):
    """Runs `kdpipe ARGS` in-process; asserts success (or failure) and returns the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, (
            f"kdpipe {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
        )
    else:
        assert result.exit_code != 0, f"kdpipe {' '.join(map(str, args))} should have failed:\n{result.output}"
    return result


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The default teacher (resnet20) trained on digits with a short schedule; returns teach's summary."""
    out = tmp_path_factory.mktemp("teacher")
    return teach("resnet20", "digits", str(out), epochs=TEACH_EPOCHS, seed=0, device="cpu")


@pytest.fixture(scope="session")
def scored_store(digits_teacher, tmp_path_factory):
    """400 cached train samples of two teacher taps (several blocks), scored: top-2 are both taps."""
    from pipeline.extract import extract
    from pipeline.score import score

    out = tmp_path_factory.mktemp("distill_store")
    with small_chunks():
        extract(
            "resnet20",
            "digits",
            str(out),
            checkpoint=digits_teacher["checkpoint"],
            layers=("layer2.2", "layer3.2"),
            max_samples=400,
            device="cpu",
        )
    score(str(out), top_k=2, plot=False)
    return out


def make_store(
    path, features: dict, labels, dataset_size: int | None = None, num_classes: int | None = None, complete: bool = True
):
    """A feature store written directly from arrays (one 'train' split), for tests that need exact contents."""
    import numpy as np

    from cache.store import ArraySpec, FeatureStore

    labels = np.asarray(labels, dtype=np.int64)
    num_classes = num_classes or int(labels.max()) + 1
    taps = [
        {"index": i, "name": name, "shape": list(x.shape[1:]), "kind": "map"}
        for i, (name, x) in enumerate(features.items())
    ]
    identity = {
        "teacher": {"name": "synthetic", "checkpoint_sha256": None},
        "taps": taps,
        "dataset": {"name": "synthetic", "num_classes": num_classes},
    }
    store = FeatureStore.create(
        path,
        {
            "identity": identity,
            "config_hash": "test",
            "kdpipe_version": "test",
            "created": "now",
            "checkpoint_path": None,
        },
    )
    specs = [ArraySpec(f"features/{name}", x.shape[1:], "float16") for name, x in features.items()]
    specs.append(ArraySpec("labels", (), "int64", sets_block=False))
    part = store.create_split(
        "train",
        len(labels),
        specs,
        list(features),
        {"split": "train", "dataset_size": dataset_size or len(labels), "fingerprint": "test"},
    )
    for name, x in features.items():
        part.array(f"features/{name}")[:] = x.astype(np.float16)
    part.array("labels")[:] = labels
    if complete:
        for block in range(part.num_blocks):
            part.mark_block_done(block)
        part.mark_complete()
        store.mark_complete()
    return store
