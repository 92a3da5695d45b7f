"""Dataset loaders: the embedded digits split, and CIFAR / ImageFolder read from small files written here."""

from __future__ import annotations

import io
import pickle
import re
import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from helpers import TouchOnLoad, assert_one_line_error, run_cli
from pipeline.data.datasets import Preprocessing, held_out_split, load_split
from pipeline.errors import UserError


def test_digits_split_is_fixed_stratified_and_normalised():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert np.bincount(test.labels).min() >= 35  # stratified: every class about 36 times
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert x.shape[1:] == (3, 32, 32)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert train.fingerprint() == load_split("digits", "train").fingerprint() != test.fingerprint()
    assert held_out_split("digits") == "test"


def test_digits_input_size_is_recorded():
    data = load_split("digits", "test", input_size=48)
    assert data[0][0].shape == (3, 48, 48)
    assert data.preprocessing.to_dict()["input_size"] == 48


def test_crop_pct_resizes_larger_then_centre_crops():
    """crop_pct < 1 resizes the shorter side to floor(size / crop_pct), as timm's eval transform, then crops: checked
    by hand on one digit served through load_split with that preprocessing."""
    import timm.data

    prep = Preprocessing(32, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), "bicubic", crop_pct=0.875)
    test = load_split("digits", "test", preprocessing=prep)
    assert test.preprocessing == prep and len(test) == 360
    raw = test.images.images[5]  # uint8 (3, 8, 8), as stored
    resized = v2.functional.resize(raw, [36], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    cropped = v2.functional.center_crop(resized, [32, 32]).float() / 255
    by_hand = (cropped - torch.tensor(prep.mean)[:, None, None]) / torch.tensor(prep.std)[:, None, None]
    torch.testing.assert_close(test[5][0], by_hand)
    uncropped = Preprocessing(32, prep.mean, prep.std, "bicubic").transform()(raw)
    assert uncropped.shape == by_hand.shape and not torch.allclose(uncropped, by_hand)
    timm_eval = timm.data.create_transform(32, crop_pct=0.875, interpolation="bicubic")
    assert timm_eval.transforms[0].size == 36 and timm_eval.transforms[1].size == (32, 32)


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's str (SHORT_BINSTRING / BINSTRING), as the real CIFAR batches hold their keys,
    class names and array data."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        size = len(obj)
        opcode = pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<i", size)
        self.write(opcode + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    """`obj` pickled as Python 2's cPickle (protocol 2) pickled the CIFAR batches: keys and names as byte strings,
    numpy's array reconstruction under its old module name."""
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta"),
}
KEYS = {"cifar10": ("labels", "label_names"), "cifar100": ("fine_labels", "fine_label_names")}


def write_cifar(root, name: str, style: str, data: dict | None = None, per_file: int = 7):
    """A fake CIFAR folder in torchvision's layout, pickled as Python 2 did (`py2`) or Python 3 does, with str keys
    and names (`py3`) or bytes ones (`py3-bytes`); `data` replaces a file's batch. Returns {file: (pixels (N, 3072),
    labels)} and the class names."""
    base, train_files, test_file, meta = CIFAR[name]
    label_key, names_key = KEYS[name]
    folder = root / base
    folder.mkdir(parents=True)
    dump = py2_pickle if style == "py2" else lambda obj: pickle.dumps(obj, protocol=4)
    key = (lambda k: k) if style == "py3" else (lambda k: k.encode())
    rng = np.random.default_rng(len(name))
    written = {}
    for file in train_files + [test_file]:
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_file).tolist()
        entry = {key("data"): pixels, key(label_key): labels, key("batch_label"): key(f"batch {file}")}
        (folder / file).write_bytes(dump((data or {}).get(file, entry)))
        written[file] = (pixels, labels)
    classes = [f"class{i}" for i in range(10)]
    (folder / meta).write_bytes(dump({key(names_key): [key(c) for c in classes]}))
    return written, classes


@pytest.mark.parametrize("style", ["py2", "py3", "py3-bytes"])
@pytest.mark.parametrize("name", list(CIFAR))
def test_cifar_reads_the_batches_as_written(tmp_path, name, style):
    """Every pixel, label and class name as written; the images as torchvision's own reader lays them out."""
    written, classes = write_cifar(tmp_path, name, style)
    _, train_files, test_file, _ = CIFAR[name]
    for split, files in (("train", train_files), ("test", [test_file])):
        data = load_split(name, split, root=str(tmp_path))
        pixels = np.concatenate([written[f][0] for f in files]).reshape(-1, 3, 32, 32)
        assert np.array_equal(data.images.images.numpy(), pixels)
        assert data.labels.tolist() == [label for f in files for label in written[f][1]]
        assert data.classes == classes and data[1][0].shape == (3, 32, 32)
        if style == "py3":  # torchvision unpickles the same files: the same images in the same order
            reference = torchvision_cifar(name, tmp_path, split)
            assert np.array_equal(data.images.images.permute(0, 2, 3, 1).numpy(), reference.data)
            assert data.labels.tolist() == reference.targets and data.classes == reference.classes


def torchvision_cifar(name: str, root, split: str):
    """torchvision's own reader (pickle.load) on trusted files, without its md5 checks (the files are fakes)."""
    tv_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100

    class Reference(tv_class):
        train_list = [[f, None] for f, _ in tv_class.train_list]
        test_list = [[f, None] for f, _ in tv_class.test_list]
        meta = {**tv_class.meta, "md5": None}

    return Reference(str(root), train=split == "train")


def test_a_batch_file_that_would_run_code_is_refused(tmp_path):
    """The payload is live (plain pickle.load creates its file), yet `kdpipe extract` refuses the batch in one line
    naming the file and the global, and nothing of it ran."""
    pickle.loads(pickle.dumps(TouchOnLoad(tmp_path / "plain-pickle-ran")))
    assert (tmp_path / "plain-pickle-ran").exists()
    marker = tmp_path / "kdpipe-ran"
    write_cifar(tmp_path / "data", "cifar10", "py3", data={"data_batch_2": {"data": TouchOnLoad(marker), "labels": []}})
    args = ["extract", "--dataset", "cifar10", "--data-root", tmp_path / "data", "--out", tmp_path / "out"]
    result = run_cli(*args, "--device", "cpu", expect_ok=False)
    assert_one_line_error(result, "cifar-10-batches-py/data_batch_2", "it names pathlib.Path.touch")
    assert not marker.exists() and not (tmp_path / "out").exists()


def _replace(file: str, entry) -> Callable:
    return lambda folder: (folder / file).write_bytes(pickle.dumps(entry, protocol=4))


@pytest.mark.parametrize(
    "damage,fragment",
    [
        (_replace("data_batch_1", {"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}), "'data' is not an"),
        (_replace("data_batch_1", {"data": np.zeros((3, 3072), np.uint8), "labels": [0, 10, 2]}), "labels in 0..9"),
        (_replace("data_batch_1", {"data": np.zeros((3, 3072), np.uint8), "labels": [0.0, 1.0, 2.0]}), "'labels'"),
        (_replace("batches.meta", {"label_names": "not a list"}), "'label_names' is not a list of class names"),
        (_replace("data_batch_1", [1, 2, 3]), "holds a list, not a CIFAR batch's dict"),
        (lambda folder: (folder / "data_batch_1").write_bytes(b"\x80\x04junk"), "as a CIFAR python batch"),
        (
            lambda folder: (folder / "data_batch_1").write_bytes(
                pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, protocol=5)
            ),
            "it names numpy._core.numeric._frombuffer",
        ),
        (lambda folder: (folder / "data_batch_3").unlink(), "data_batch_3 is missing"),
    ],
)
def test_damaged_cifar_files_are_named(tmp_path, damage, fragment):
    write_cifar(tmp_path, "cifar10", "py3")
    damage(tmp_path / "cifar-10-batches-py")
    with pytest.raises(UserError, match=re.escape(fragment)) as refused:
        load_split("cifar10", "train", root=str(tmp_path))
    assert "cifar-10-batches-py/" in str(refused.value)


def test_cifar_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data root not found"):
        load_split("cifar10", "train", root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="not found under"):
        load_split("cifar10", "train", root=str(tmp_path))
    with pytest.raises(UserError, match="needs data_root="):
        load_split("cifar100", "train")


def test_imagefolder_shares_the_train_label_map(tmp_path):
    for split, classes in (("train", ["ant", "bee", "cat"]), ("val", ["bee", "cat"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (40, 30), (k * 100, 50, 200)).save(tmp_path / split / c / f"{k}.png")
    train = load_split("imagefolder", "train", root=str(tmp_path), input_size=16)
    val = load_split("imagefolder", "val", root=str(tmp_path), input_size=16)
    assert train.classes == val.classes == ["ant", "bee", "cat"]
    assert sorted(set(val.labels.tolist())) == [1, 2]
    assert val[0][0].shape == (3, 16, 16)
    assert held_out_split("imagefolder") == "val"
    with pytest.raises(UserError, match="has no split 'test'"):
        load_split("imagefolder", "test", root=str(tmp_path))


def test_imagefolder_lists_the_files_torchvision_lists_in_its_order(tmp_path):
    """Regular files and plain folders: exactly torchvision's samples, in its order (nested folders sorted by path,
    which is not a depth-first walk: `b-x` sorts before `b/c`), so stores' fingerprints stay what they were."""
    from helpers import write_png
    from pipeline.data.datasets import LabelledImageFolder

    for folder in ("train/ant", "train/ant/b", "train/ant/b-x", "train/ant/b/c", "train/bee"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        write_png(tmp_path / folder / "0.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "train/ant/notes.txt").write_text("not an image")
    ours = LabelledImageFolder(str(tmp_path / "train"), ["ant", "bee"], transform=None).samples
    theirs = torchvision.datasets.ImageFolder(str(tmp_path / "train")).samples
    assert ours == theirs and len(ours) == 5
    assert [p.split("train/")[1] for p, _ in ours][:4] == ["ant/0.png", "ant/b/0.png", "ant/b-x/0.png", "ant/b/c/0.png"]


@pytest.mark.parametrize("fault", ["named pipe", "symlink loop", "decoder error"])
def test_an_image_folder_with_a_pipe_a_loop_or_an_undecodable_image_is_one_line(fault, tmp_path, monkeypatch):
    """A named pipe is never opened (it would block the fingerprint forever), a folder symlink back up is refused
    (it would repeat images under the wrong class), and a decoder error of any class names the image."""
    import os

    from helpers import write_image_folder

    root = write_image_folder(tmp_path / "images", {"train": {"ant": 3, "bee": 3}, "val": {"ant": 1, "bee": 1}})
    if fault == "named pipe":
        os.mkfifo(root / "train" / "ant" / "blocked.png")
        expected = ["blocked.png is not a regular file (a named pipe)"]
    elif fault == "symlink loop":
        os.symlink("..", root / "train" / "bee" / "up")
        expected = ["/train/bee/up/", "leads back to", "a folder symlink loop"]
    else:
        from PIL import Image as PILImage

        def bomb(*args, **kwargs):
            raise PILImage.DecompressionBombError("Image size (999999999 pixels) exceeds limit")

        monkeypatch.setattr(PILImage, "open", bomb)
        expected = ["cannot read image", ".png: Image size (999999999 pixels) exceeds limit"]
    args = ["teach", "--teacher", "resnet8", "--dataset", "imagefolder", "--data-root", root, "--input-size", 16]
    result = run_cli(
        *args, "--epochs", 1, "--batch-size", 2, "--out", tmp_path / "t", "--device", "cpu", expect_ok=False
    )
    assert_one_line_error(result, *expected)
