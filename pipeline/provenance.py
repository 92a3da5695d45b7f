"""Where a later stage finds its data, and checks that a feature store matches the data it is about to pair it with."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cache.store import FeatureStore, SplitStore

from .datasets import Preprocessing, SplitData, load_split
from .errors import UserError
from .fingerprint import FULL_SCHEMES

log = logging.getLogger(__name__)


def open_complete_store(path: str, split: str = "train", mode: str = "r") -> tuple[FeatureStore, SplitStore]:
    store = FeatureStore.open(path, mode=mode)
    if not store.complete:
        raise UserError(f"{store.path} is incomplete; finish it by rerunning the same kdpipe extract")
    return store, store.split(split)


def load_matching_split(
    store: FeatureStore,
    split: str,
    dataset: str | None,
    data_root: str | None,
    download: bool = False,
    fingerprint: str = "auto",
) -> SplitData:
    """The dataset split the store was extracted from, served with the preprocessing recorded in the store (the
    pixels its teacher saw) and checked field by field.

    A different dataset name, split size or data fingerprint is refused with the field named. The fingerprint is
    recomputed with the scheme the store records; `fingerprint` "full" refuses a store whose scheme did not hash
    every sample's content.
    """
    recorded = store.meta["identity"]["dataset"]
    name = dataset or recorded["name"]
    if name != recorded["name"]:
        raise UserError(f"{store.path} was extracted from dataset {recorded['name']!r}, not {name!r}")
    preprocessing = Preprocessing.from_dict(recorded["preprocessing"])
    data = load_split(name, split, data_root, download=download, preprocessing=preprocessing)
    expected = store.split(split).group.attrs if split in store.split_names() else recorded["splits"].get(split, {})
    size = expected.get("dataset_size", expected.get("size"))
    if size is not None and size != len(data):
        raise UserError(
            f"{store.path} does not match the data given: {split} split size differs ({size} vs {len(data)})"
        )
    scheme = _recorded_scheme(store, split, expected, fingerprint)
    if scheme and expected["fingerprint"] != data.fingerprint(scheme):
        raise UserError(
            f"{store.path} does not match the data given: {split} data fingerprint differs "
            f"({expected['fingerprint']} vs {data.fingerprint(scheme)}, scheme {scheme})"
        )
    return data


def absolute_root(root: str | None) -> str | None:
    """A data root as recorded: absolute (symlinks kept, so a re-pointed link is followed), or None."""
    return os.path.abspath(root) if root is not None else None


def recorded_data_root(given: str | None, recorded: str | None, recorder: str | Path) -> str | None:
    """The data root a stage reads: the one given, else the one `recorder` (a store, a run) recorded, which must
    still exist; None for datasets that need none. Returned absolute, as it is recorded in turn."""
    if given is not None or recorded is None:
        return absolute_root(given)
    if not Path(recorded).is_dir():
        raise UserError(f"{recorder} records data root {recorded}, which no longer exists; pass --data-root")
    return recorded


def _recorded_scheme(store: FeatureStore, split: str, expected, mode: str) -> str | None:
    """The fingerprint scheme to recompute: the store's; None for a store without a fingerprint, or one from before
    schemes were recorded (its 32-sample fingerprint is no longer computed: a warning says so)."""
    scheme = expected.get("fingerprint_scheme")
    if mode == "full" and scheme not in FULL_SCHEMES:
        held = f"a {scheme} fingerprint" if scheme else "no fingerprint kdpipe recomputes"
        raise UserError(
            f"--fingerprint full: {store.path} holds {held} of its {split} split, not one of every sample's content; "
            "extract it again with --fingerprint full"
        )
    if expected.get("fingerprint") is not None and scheme is None:
        log.warning(
            "%s predates recorded fingerprint schemes: only the size of its %s split is checked against the data "
            "(extract it again for a fingerprint of every sample)",
            store.path,
            split,
        )
    return scheme
