"""Dataset loaders: the embedded digits split, and CIFAR / ImageFolder read from small files written here."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.datasets import Preprocessing, held_out_split, load_split
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


def _write_cifar(
    root, base: str, train_files: list[str], test_file: str, meta: tuple[str, str], label_key: str, n: int
):
    folder = root / base
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in train_files + [test_file]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"class{i}" for i in range(10)]}))


@pytest.mark.parametrize(
    "name,base,train_files,test_file,meta,label_key",
    [
        (
            "cifar10",
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            ("batches.meta", "label_names"),
            "labels",
        ),
        ("cifar100", "cifar-100-python", ["train"], "test", ("meta", "fine_label_names"), "fine_labels"),
    ],
)
def test_cifar_reads_local_batches(tmp_path, name, base, train_files, test_file, meta, label_key):
    _write_cifar(tmp_path, base, train_files, test_file, meta, label_key, n=4)
    train = load_split(name, "train", root=str(tmp_path))
    test = load_split(name, "test", root=str(tmp_path))
    assert len(train) == 4 * len(train_files) and len(test) == 4
    image, label = train[1]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    assert train.classes[3] == "class3"


def test_cifar_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data root not found"):
        load_split("cifar10", "train", root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="not found under"):
        load_split("cifar10", "train", root=str(tmp_path))
    with pytest.raises(UserError, match="needs --data-root"):
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
