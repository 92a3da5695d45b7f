"""Dataset faults in every stage that loads data: a split with fewer than two classes, or a class that a split or
subset leaves empty, is one line before any work; fingerprints cover every sample, so a changed image anywhere is
caught when a later stage pairs the data with a store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import sklearn.datasets
import zarr
from sklearn.model_selection import train_test_split

from cache.store import FeatureStore
from helpers import assert_one_line_error, run_cli, write_image_folder, write_png
from pipeline.data import datasets, fingerprint
from pipeline.data.datasets import load_split
from pipeline.layout import LABELLED_INDICES, STORE_NAME, STUDENT_WEIGHTS, TEACH_SUMMARY, TEACHER_WEIGHTS

FOLDER = {"train": {"ant": 30, "bee": 30, "cat": 2}, "val": {"ant": 3, "bee": 3, "cat": 3}}
OLD_SCHEME_SAMPLES = 32  # the fingerprint before this one hashed 32 evenly spaced samples
CHANGED = 2  # train sample 2 (ant/002.png): one the old scheme skipped for 62 images
SMALL = ["--model-kwargs", "{base_width: 4}", "--device", "cpu"]
STUDENT = ["--student", "resnet8", *SMALL]
TAPS = ["--teacher-layers", "layer3.0", "--student-layers", "layer3.0", "--batch-size", 8, "--steps", 1]


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A 3-class image folder (62 train images, 'cat' with 2) and a resnet8 taught on it for one epoch."""
    base = tmp_path_factory.mktemp("folder")
    root = write_image_folder(base / "data", FOLDER)
    args = ["teach", "--dataset", "imagefolder", "--data-root", root, "--input-size", 16, "--epochs", 1]
    run_cli(*args, "--teacher", "resnet8", *SMALL, "--batch-size", 16, "--out", base / "teacher")
    return root, base / "teacher"


@pytest.fixture
def folder(taught, tmp_path):
    """This test's own copy of the image folder, to change."""
    return shutil.copytree(taught[0], tmp_path / "data")


def extract_folder(root, checkpoint, out, *extra, expect_ok=True):
    args = ["extract", "--dataset", "imagefolder", "--data-root", root, "--input-size", 16, "--teacher", "resnet8"]
    args += ["--checkpoint", checkpoint, "--layers", "layer3.0", "--device", "cpu", "--out", out]
    return run_cli(*args, *extra, expect_ok=expect_ok)


def distill_folder(store, root, out, *extra, expect_ok=True):
    return run_cli("distill", store, "--data-root", root, *STUDENT, *TAPS, "--out", out, *extra, expect_ok=expect_ok)


def store_scheme(store) -> str:
    return FeatureStore.open(store).meta["identity"]["dataset"]["splits"]["train"]["fingerprint_scheme"]


def sample_path(root, index: int):
    return load_split("imagefolder", "train", root=str(root)).images.samples[index][0]


# ---------------------------------------------------------------------------------------------------------------
# Class checks


@pytest.mark.parametrize(
    "counts,command,fragment",
    [
        ({"train": {"cat": 4}, "val": {"cat": 2}}, "teach", "dataset 'imagefolder' train split holds 1 class ('cat')"),
        ({"train": {"cat": 4}, "val": {"cat": 2}}, "extract", "dataset 'imagefolder' train split holds 1 class"),
        (
            {"train": {"ant": 4, "bee": 4, "dog": 0}, "val": {"ant": 2}},
            "teach",
            "dataset 'imagefolder' train split has no sample of class 'dog'",
        ),
    ],
)
def test_a_split_without_two_classes_or_with_an_empty_one_is_refused(tmp_path, counts, command, fragment):
    root = write_image_folder(tmp_path / "data", counts)
    args = [command, "--dataset", "imagefolder", "--data-root", root, "--input-size", 16, "--out", tmp_path / "out"]
    assert_one_line_error(run_cli(*args, "--device", "cpu", expect_ok=False), fragment)
    assert not (tmp_path / "out").exists()


def test_max_samples_that_empty_a_class_are_refused(taught, tmp_path):
    """10 of 62 samples, stratified: 'cat' (2 of 62) gets none of them."""
    root, teacher = taught
    result = extract_folder(root, teacher / TEACHER_WEIGHTS, tmp_path / "s", "--max-samples", 10, expect_ok=False)
    assert_one_line_error(result, "dataset 'imagefolder' train split (--max-samples 10) has no sample of class 'cat'")
    assert not (tmp_path / "s").exists()


def test_a_class_too_small_to_stratify_is_named(tmp_path, taught):
    root = write_image_folder(tmp_path / "data", {"train": {"ant": 10, "bee": 10, "cat": 1}, "val": {"ant": 1}})
    result = extract_folder(root, taught[1] / TEACHER_WEIGHTS, tmp_path / "s", "--max-samples", 10, expect_ok=False)
    assert_one_line_error(result, "--max-samples 10: cannot draw", "class 'cat' has a single sample")


def test_distill_and_probe_check_the_classes_they_train_on(taught, tmp_path):
    """A label fraction that leaves 'cat' unlabelled, cached rows of one class, and a labelled subset of one class
    are each refused before training, in one line naming the class."""
    root, teacher = taught
    extract_folder(root, teacher / TEACHER_WEIGHTS, tmp_path / "s")
    result = distill_folder(tmp_path / "s", root, tmp_path / "r", "--label-fraction", 0.1, expect_ok=False)
    assert_one_line_error(result, "train split (--label-fraction 0.1) has no sample of class 'cat'")
    assert not (tmp_path / "r").exists()

    distill_folder(tmp_path / "s", root, tmp_path / "r")
    ants = np.flatnonzero(load_split("imagefolder", "train", root=str(root)).labels == 0)
    np.save(tmp_path / "r" / LABELLED_INDICES, ants[:5])
    result = run_cli("probe", tmp_path / "r", "--data-root", root, "--device", "cpu", expect_ok=False)
    assert_one_line_error(result, "train split (the 5 labelled samples) holds 1 class ('ant')")

    shutil.copytree(tmp_path / "s", tmp_path / "ants")
    indices = zarr.open_group(str(tmp_path / "ants" / STORE_NAME), mode="r+")["train/indices"]
    indices[:] = ants[np.arange(indices.shape[0]) % len(ants)]
    result = distill_folder(tmp_path / "ants", root, tmp_path / "r2", expect_ok=False)
    assert_one_line_error(result, "dataset 'imagefolder' train split holds 1 class ('ant')")
    assert not (tmp_path / "r2" / STUDENT_WEIGHTS).exists()


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def test_the_files_scheme_is_the_documented_hash(taught):
    """teach records the fingerprint and scheme of its train split; both are what docs/datasets.md says, recomputed
    here by hand: name, split, size, classes and scheme, the labels, and each file's relative path, size and
    content hash."""
    root, teacher = taught
    data = load_split("imagefolder", "train", root=str(root))
    digest = hashlib.sha256(json.dumps(["imagefolder", "train", 62, ["ant", "bee", "cat"], "files"]).encode())
    digest.update(data.labels.astype(np.int64).tobytes())
    for path, _ in data.images.samples:
        content = open(path, "rb").read()
        digest.update(json.dumps([os.path.relpath(path, root / "train"), len(content)]).encode())
        digest.update(hashlib.sha256(content).digest())
    summary = json.loads((teacher / TEACH_SUMMARY).read_text())
    assert summary["dataset_fingerprint_scheme"] == "files"
    assert summary["dataset_fingerprint"] == digest.hexdigest() == data.fingerprint()


def test_a_changed_image_the_old_scheme_skipped_is_caught(taught, folder, tmp_path):
    root, teacher = taught
    assert CHANGED not in np.linspace(0, 61, OLD_SCHEME_SAMPLES, dtype=np.int64)
    extract_folder(folder, teacher / TEACHER_WEIGHTS, tmp_path / "s")
    distill_folder(tmp_path / "s", folder, tmp_path / "r", "--check")  # the unchanged data pairs with the store
    write_png(sample_path(folder, CHANGED), np.zeros((8, 8, 3), np.uint8))
    result = distill_folder(tmp_path / "s", folder, tmp_path / "r", expect_ok=False)
    assert_one_line_error(result, "does not match the data given: train data fingerprint differs", "scheme files")


def test_full_fingerprint_sees_a_change_that_keeps_size_and_mtime(taught, folder, tmp_path, monkeypatch):
    """A folder past the small-tree limits (lowered here) gets the sampled scheme under auto, which reads 4 files'
    content; a same-size rewrite of another file with its mtime restored passes it, and not --fingerprint full."""
    monkeypatch.setattr(fingerprint, "SMALL_TREE_FILES", 10)
    monkeypatch.setattr(fingerprint, "SAMPLED_FILES", 4)
    teacher = taught[1] / TEACHER_WEIGHTS
    extract_folder(folder, teacher, tmp_path / "auto")
    extract_folder(folder, teacher, tmp_path / "full", "--fingerprint", "full")
    assert (store_scheme(tmp_path / "auto"), store_scheme(tmp_path / "full")) == ("sampled", "files")
    path = sample_path(folder, CHANGED)
    assert CHANGED not in fingerprint.sampled_files(62)
    before = os.stat(path)
    write_png(path, np.zeros((8, 8, 3), np.uint8))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    distill_folder(tmp_path / "auto", folder, tmp_path / "r", "--check")  # the sample did not include the file
    result = distill_folder(tmp_path / "full", folder, tmp_path / "r", expect_ok=False)
    assert_one_line_error(result, "train data fingerprint differs", "scheme files")
    result = distill_folder(tmp_path / "auto", folder, tmp_path / "r", "--fingerprint", "full", expect_ok=False)
    assert_one_line_error(result, "--fingerprint full:", "holds a sampled fingerprint of its train split")


def test_mtime_counts_only_in_the_sampled_scheme(folder):
    data = load_split("imagefolder", "train", root=str(folder))
    files, sampled = data.fingerprint("files"), data.fingerprint("sampled")
    os.utime(sample_path(folder, CHANGED), ns=(0, 0))
    again = load_split("imagefolder", "train", root=str(folder))
    assert again.fingerprint("files") == files and again.fingerprint("sampled") != sampled


def test_every_digit_is_fingerprinted(scored_store, tmp_path, monkeypatch):
    """One grey level of train sample 1 (which the old 32-sample scheme skipped) changes the digits fingerprint,
    and distill refuses the store extracted from the unchanged digits."""
    original = load_split("digits", "train")
    assert 1 not in np.linspace(0, len(original) - 1, OLD_SCHEME_SAMPLES, dtype=np.int64)
    changed = sklearn.datasets.load_digits()
    train_idx, _ = train_test_split(np.arange(1797), test_size=0.2, stratify=changed.target, random_state=0)
    raw = np.sort(train_idx)[1]  # the fixed split of pipeline.data.datasets.digits
    assert np.array_equal(np.rint(changed.images[raw] * 255 / 16), original.images.images[1, 0].numpy())
    changed.images[raw, 0, 0] += 1
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: changed)
    datasets._digits_arrays.cache_clear()  # a process reads the digits once: this one reads the changed copy
    try:
        assert load_split("digits", "train").fingerprint() != original.fingerprint()
        result = run_cli("distill", scored_store, "--device", "cpu", "--out", tmp_path / "r", expect_ok=False)
    finally:
        monkeypatch.undo()
        datasets._digits_arrays.cache_clear()
    assert_one_line_error(result, "train data fingerprint differs", "scheme array")


def test_a_store_from_before_fingerprint_schemes_is_checked_by_size(scored_store, tmp_path, caplog):
    """Its 32-sample fingerprint is no longer computed: distill pairs it by split size, with a warning, and
    --fingerprint full refuses it."""
    old = shutil.copytree(scored_store, tmp_path / "old")
    group = zarr.open_group(str(old / STORE_NAME), mode="r+")
    del group["train"].attrs["fingerprint_scheme"]
    group["train"].attrs["fingerprint"] = "0" * 64
    run_cli("distill", old, "--check", "--device", "cpu", "--out", tmp_path / "r")
    assert "predates recorded fingerprint schemes: only the size of its train split is checked" in caplog.text
    result = run_cli(
        "distill", old, "--fingerprint", "full", "--device", "cpu", "--out", tmp_path / "r", expect_ok=False
    )
    assert_one_line_error(result, "--fingerprint full:", "holds no fingerprint kdpipe recomputes of its train split")
