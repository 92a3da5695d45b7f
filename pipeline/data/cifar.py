"""CIFAR-10/100 python batches, read without running code from them.

The batches are pickles; `pickle.load` would call whatever they name, so a crafted batch file runs code. They are
read by `BatchUnpickler`, which resolves only the globals a batch needs (numpy's array reconstruction) and refuses
any other with a UserError naming the file. The layout and file names are torchvision's; `--download` lets
torchvision fetch the archive (it verifies the archive's md5), reading never goes through it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, first_line

PIXELS = 3 * 32 * 32
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array reconstruction, whichever module numpy keeps it in
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch: containers, strings and numbers, and numpy arrays; any other global is refused."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the batches were pickled by Python 2, as torchvision reads them
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UserError(
                f"refusing to unpickle {self.path}: it names {module}.{name}, which a CIFAR batch never holds "
                "(only numpy arrays, lists, strings and numbers)"
            )
        return ALLOWED_GLOBALS[module, name]


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR dataset's batches lie under the data root, and the keys they hold."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str
    label_key: str
    url: str
    archive: str
    archive_md5: str

    @classmethod
    def of(cls, tv_class: type, label_key: str) -> CifarLayout:
        """torchvision's layout for its CIFAR dataset class."""
        return cls(
            tv_class.base_folder,
            tuple(f for f, _ in tv_class.train_list),
            tuple(f for f, _ in tv_class.test_list),
            tv_class.meta["filename"],
            tv_class.meta["key"],
            label_key,
            tv_class.url,
            tv_class.filename,
            tv_class.tgz_md5,
        )

    def files(self, split: str) -> tuple[str, ...]:
        return (*(self.train if split == "train" else self.test), self.meta)


def read_cifar(name: str, layout: CifarLayout, split: str, root: str, download: bool):
    """(uint8 images (N, 3, 32, 32), labels, class names) of one split under `root`, downloading it first when
    asked to and a file is missing."""
    folder = Path(root) / layout.folder
    if download and not all((folder / f).is_file() for f in layout.files(split)):
        _download(name, layout, root)
    if not folder.is_dir():
        raise UserError(f"{name} not found under {root} (expected {layout.folder}/); --download fetches it")
    classes = _class_names(folder / layout.meta, layout.names_key)
    batches = [_batch(folder / f, layout.label_key, len(classes)) for f in layout.files(split)[:-1]]
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images), np.concatenate([labels for _, labels in batches]), classes


def _download(name: str, layout: CifarLayout, root: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(layout.url, root, filename=layout.archive, md5=layout.archive_md5)
    except Exception as err:  # no network, a refused connection, a corrupt archive, a full disk, ...
        raise UserError(f"cannot download {name} from {layout.url}: {first_line(err)}") from err


def load_batch(path: Path) -> dict:
    """A batch file's dict, its keys as str (bytes keys, as Python 3 re-pickled copies hold, decoded)."""
    try:
        with path.open("rb") as f:
            entry = BatchUnpickler(f, path).load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path} is missing; --download fetches the whole archive") from None
    except Exception as err:  # a truncated or foreign file: whatever the unpickler or numpy meets
        raise UserError(f"cannot read {path} as a CIFAR python batch: {first_line(err)}") from err
    if not isinstance(entry, dict):
        raise UserError(f"{path} holds a {type(entry).__name__}, not a CIFAR batch's dict")
    return {_text(k): v for k, v in entry.items()}


def _class_names(path: Path, key: str) -> list[str]:
    names = load_batch(path).get(key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, bytes)) for n in names):
        raise UserError(f"{path}: {key!r} is not a list of class names")
    return [_text(n) for n in names]


def _batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = load_batch(path)
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise UserError(f"{path}: 'data' is not an (N, {PIXELS}) uint8 array")
    labels = _labels(entry.get(label_key))
    if labels is None or labels.shape != (len(data),) or np.any((labels < 0) | (labels >= num_classes)):
        raise UserError(f"{path}: {label_key!r} is not a list of {len(data)} labels in 0..{num_classes - 1}")
    return data, labels


def _labels(value) -> np.ndarray | None:
    if isinstance(value, list) and all(type(v) is int for v in value):
        return np.array(value, dtype=np.int64)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return value.astype(np.int64)
    return None


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value
