"""Where a later stage finds its data and its teacher's weights, and checks that a feature store matches the data it
is about to pair it with."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cache.location import is_remote
from cache.store import FeatureStore, SplitStore

from ..data.datasets import Preprocessing, SplitData, load_split
from ..data.fingerprint import FULL_SCHEMES
from ..errors import UserError
from .checkpoints import file_sha256

log = logging.getLogger(__name__)


def open_complete_store(path: str, split: str = "train", mode: str = "r") -> tuple[FeatureStore, SplitStore]:
    store = FeatureStore.open_complete(path, mode=mode)
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
    recorded = store.identity.dataset
    name = dataset or recorded.name
    if name != recorded.name:
        raise UserError(f"{store.path} was extracted from dataset {recorded.name!r}, not {name!r}")
    preprocessing = Preprocessing.from_dict(recorded.preprocessing)
    data = load_split(name, split, data_root, download=download, preprocessing=preprocessing)
    expected = _split_data_record(store, split)
    size = expected.get("size")
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


def checkpoint_places(checkpoint: str | None, store_folder) -> dict[str, str | None]:
    """Where extract read the teacher's weights, as the store records it: the absolute path, and the path relative to
    the folder holding the store (none for a store on object storage), so that a later stage finds the file from any
    working directory, and after the folder holding both was moved whole."""
    if checkpoint is None:
        return {"checkpoint_path": None, "checkpoint_relative": None}
    path = os.path.abspath(checkpoint)
    relative = None if is_remote(store_folder) else os.path.relpath(path, os.path.abspath(store_folder))
    return {"checkpoint_path": path, "checkpoint_relative": relative}


def recorded_checkpoint(store: FeatureStore, given: str | None, purpose: str) -> str | None:
    """The teacher weights a stage rebuilding the store's teacher loads, for `purpose` (an option, named in errors):
    `given`, else the first of `checkpoint_candidates` holding a file of the recorded sha256; None for a teacher
    extracted without a checkpoint. A file of another sha256 is never used: given, it is refused naming both files;
    at a recorded place, the next place is tried, and the error names every place when none is left."""
    expected = store.identity.teacher.checkpoint_sha256
    if given is not None:
        _check_given_checkpoint(store, given, expected, purpose)
        return given
    if expected is None:
        return None
    candidates, refused = checkpoint_candidates(store), []
    for path in candidates:
        actual = file_sha256(path) if path.is_file() else None
        if actual == expected:
            if path != candidates[0]:
                log.info("%s: teacher weights found at %s, not at %s as recorded", store.path, path, candidates[0])
            return str(path)
        refused.append(f"{path} holds another file (sha256 {actual[:16]})" if actual else f"{path} does not exist")
    raise UserError(
        f"{purpose}: cannot find the teacher checkpoint {store.path} was extracted with (sha256 {expected[:16]}): "
        f"{'; '.join(refused) or 'the store records no place'}; pass --teacher-checkpoint with that file"
    )


def _check_given_checkpoint(store: FeatureStore, given: str, expected: str | None, purpose: str) -> None:
    if not Path(given).is_file():
        raise UserError(f"{purpose}: --teacher-checkpoint={given} does not exist")
    actual = file_sha256(given)
    if actual != expected:
        recorded = store.provenance.checkpoint_path or "pretrained weights, no checkpoint"
        raise UserError(
            f"{purpose}: {given} (sha256 {actual[:16]}) is not the checkpoint {store.path} was extracted with "
            f"({recorded}, sha256 {(expected or 'none')[:16]})"
        )


def checkpoint_candidates(store: FeatureStore) -> list[Path]:
    """Where to look for the store's teacher weights, in order. A record with `checkpoint_relative`: its absolute
    path, then its path from the folder holding the store (moved with it). An older record holds the path as
    extract was given it: absolute, or relative to where extract ran, tried from the working directory and then
    from the folder holding the store and each folder above it (one of them is likely where extract ran)."""
    provenance = store.provenance
    recorded = provenance.checkpoint_path
    if recorded is None:
        return []
    if is_remote(store.path):
        return [Path(recorded)]
    folder = Path(os.path.abspath(store.path)).parent
    if provenance.relative_recorded:
        relative = provenance.checkpoint_relative
        places = [Path(recorded), *([folder / relative] if relative else [])]
    elif Path(recorded).is_absolute():
        places = [Path(recorded)]
    else:
        places = [Path(os.path.abspath(recorded)), *(above / recorded for above in [folder, *folder.parents])]
    return list(dict.fromkeys(Path(os.path.normpath(place)) for place in places))  # `..` collapsed as written


def _split_data_record(store: FeatureStore, split: str) -> dict:
    """What the store recorded of the data of `split`: its size, fingerprint and scheme (from the split's own record
    once it exists, else from the identity)."""
    if split not in store.split_names():
        return store.identity.dataset.splits.get(split, {})
    record = store.split(split).record
    scheme = {"fingerprint_scheme": record.fingerprint_scheme} if record.fingerprint_scheme else {}
    return {"size": record.dataset_size, "fingerprint": record.fingerprint, **scheme}


def _recorded_scheme(store: FeatureStore, split: str, expected, mode: str) -> str | None:
    """The fingerprint scheme to recompute: the store's; None for a store without a fingerprint, or one from before
    schemes were recorded (its 32-sample fingerprint is no longer computed: a warning says so)."""
    scheme = expected.get("fingerprint_scheme")
    if mode == "full" and scheme not in FULL_SCHEMES:
        held = f"a {scheme} fingerprint" if scheme else "no fingerprint kdpipe recomputes"
        raise UserError(
            f"--fingerprint=full: {store.path} holds {held} of its {split} split, not one of every sample's content; "
            "extract it again with --fingerprint=full"
        )
    if expected.get("fingerprint") is not None and scheme is None:
        log.warning(
            "%s predates recorded fingerprint schemes: only the size of its %s split is checked against the data "
            "(extract it again for a fingerprint of every sample)",
            store.path,
            split,
        )
    return scheme
