"""Checks that a feature store matches the data a later stage is about to pair it with."""

from __future__ import annotations

from cache.store import FeatureStore, SplitStore

from .datasets import Preprocessing, SplitData, load_split
from .errors import UserError


def open_complete_store(path: str, split: str = "train", mode: str = "r") -> tuple[FeatureStore, SplitStore]:
    store = FeatureStore.open(path, mode=mode)
    if not store.complete:
        raise UserError(f"{store.path} is incomplete; finish it by rerunning the same kdpipe extract")
    return store, store.split(split)


def load_matching_split(
    store: FeatureStore, split: str, dataset: str | None, data_root: str | None, download: bool = False
) -> SplitData:
    """The dataset split the store was extracted from, served with the preprocessing recorded in the store (the
    pixels its teacher saw) and checked field by field.

    A different dataset name, split size or data fingerprint is refused with the field named.
    """
    recorded = store.meta["identity"]["dataset"]
    name = dataset or recorded["name"]
    if name != recorded["name"]:
        raise UserError(f"{store.path} was extracted from dataset {recorded['name']!r}, not {name!r}")
    preprocessing = Preprocessing.from_dict(recorded["preprocessing"])
    data = load_split(name, split, data_root, download=download, preprocessing=preprocessing)
    expected = store.split(split).group.attrs if split in store.split_names() else recorded["splits"].get(split, {})
    checks = [
        (f"{split} split size", expected.get("dataset_size", expected.get("size")), len(data)),
        (f"{split} data fingerprint", expected.get("fingerprint"), data.fingerprint()),
    ]
    for field, want, got in checks:
        if want is not None and want != got:
            raise UserError(f"{store.path} does not match the data given: {field} differs ({want} vs {got})")
    return data
