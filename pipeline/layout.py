"""Every file name in kdpipe's output folders, in one place (the store's own layout is `cache.store`'s).

teach OUT/      model.safetensors  teach.json  teach_log.csv  teach_args.yaml  kdpipe.lock
                epoch-NNN.safetensors + epoch-NNN.state.pt     (the two latest checkpoints, as distill's)
extract OUT/    features.zarr/  features.zarr.lock  extract.json  extract_args.yaml
                scores.json  scores.png  score_args.yaml          (written by kdpipe score, beside the store)
distill OUT/    student.safetensors  distill.json  distill_log.csv  distill_args.yaml  labelled_indices.npy
                epoch-NNN.safetensors + epoch-NNN.state.pt     (the two latest checkpoints)
                probe.json  classifier.safetensors  probe_args.yaml  (written by kdpipe probe)  kdpipe.lock
q-test OUT/     q-test.md  q-test.json  q-test.png  q-test_args.yaml  kdpipe.lock
                tap-<teacher tap>/seed-<s>/  set-<tap set>/seed-<s>/  (distill OUTs)
report OUT/     report.md  report.json  report.png  report_budget.png  report_args.yaml  kdpipe.lock
                <method entry>/seed-<s>/                       (a distill OUT, at the distill section's label fraction)
                <method entry>/labels-<fraction>/seed-<s>/     (a distill OUT, at another fraction of --label-fractions)

A store with another name than features.zarr (DIR/NAME.zarr) has its own DIR/NAME.zarr.lock and kdpipe score's
DIR/NAME.scores.json, NAME.scores.png and NAME.score_args.yaml, so that stores sharing a folder keep theirs apart.
The lock files are the writers' (`cache.lock`) and exist while one runs: a folder's inside it, a store's beside it.

Every file is written whole or not at all: NAME.tmp, synced, then renamed over NAME (`runtime.write_bytes`; zarr
writes the store's files alike); on object storage each is one PUT of the whole object, atomic as it is.

Any folder here may be a URL (`s3://bucket/runs/digits/extract`): `cache.location.location` makes it a path object of
its filesystem (a plain Path for a local one), and the names below are the same there.
"""

from __future__ import annotations

import re
from pathlib import Path

from cache.location import location
from cache.schema import STORE_NAME as STORE_NAME  # an extract folder holds the store under this name

FOLDER_LOCK = "kdpipe.lock"  # the lock of a teach, distill or report folder, inside it

TEACHER_WEIGHTS = "model.safetensors"
TEACH_SUMMARY = "teach.json"
TEACH_LOG = "teach_log.csv"

EXTRACT_SUMMARY = "extract.json"
SCORES = "scores.json"
SCORES_PLOT = "scores.png"

STUDENT_WEIGHTS = "student.safetensors"
DISTILL_SUMMARY = "distill.json"
DISTILL_LOG = "distill_log.csv"
LABELLED_INDICES = "labelled_indices.npy"  # dataset indices of the labelled train images, for the probe
_EPOCH_STATE = re.compile(r"epoch-(\d+)\.state\.pt$")

PROBE_SUMMARY = "probe.json"
CLASSIFIER = "classifier.safetensors"

REPORT_TEXT = "report.md"
REPORT_SUMMARY = "report.json"
REPORT_PLOT = "report.png"
REPORT_BUDGET_PLOT = "report_budget.png"  # top-1 against the label fraction, with --label-fractions

Q_TEST_TEXT = "q-test.md"
Q_TEST_SUMMARY = "q-test.json"
Q_TEST_PLOT = "q-test.png"  # each predictor (Q, S, I, E, depth) against the probed top-1, one panel each


def args_name(command: str) -> str:
    """The resolved options of a run: `<command>_args.yaml`, as timm's args.yaml."""
    return f"{command}_args.yaml"


def args_file(folder: str | Path, command: str) -> Path:
    return location(folder) / args_name(command)


def folder_lock(folder: str | Path) -> Path:
    return location(folder) / FOLDER_LOCK


def beside_store(store: Path, name: str) -> Path:
    """A file about a store, next to it: DIR/name for DIR/features.zarr, DIR/NAME.name for DIR/NAME.zarr."""
    return store.parent / (name if store.name == STORE_NAME else f"{store.stem}.{name}")


def score_files(store: Path) -> tuple[Path, Path, Path]:
    """What kdpipe score writes about a store: its scores, their plot and the resolved options."""
    return beside_store(store, SCORES), beside_store(store, SCORES_PLOT), beside_store(store, args_name("score"))


def derived_files(store: Path) -> list[Path]:
    """The files describing the store at `store` (in an extract folder): what replacing it makes stale."""
    return [store.parent / EXTRACT_SUMMARY, *score_files(store)]


def epoch_weights(folder: str | Path, epoch: int) -> Path:
    return location(folder) / f"epoch-{epoch:03d}.safetensors"


def epoch_state(folder: str | Path, epoch: int) -> Path:
    """Optimizer, schedule, RNG and log after `epoch`; written after its weights, so it commits them."""
    return location(folder) / f"epoch-{epoch:03d}.state.pt"


def checkpoint_epochs(folder: str | Path) -> list[int]:
    """The epochs with a committed checkpoint in `folder` (none when it does not exist), in order."""
    found = (_EPOCH_STATE.search(p.name) for p in location(folder).glob("epoch-*.state.pt"))
    return sorted(int(m.group(1)) for m in found if m)


def report_run(folder: str | Path, entry: str, seed: int, label_fraction: float | None = None) -> Path:
    """The distill folder of one report run: at the main label fraction (None) OUT/<entry>/seed-<s>, at another
    fraction of the sweep OUT/<entry>/labels-<fraction>/seed-<s> (the fraction as Python writes it: labels-0.05)."""
    entry_dir = location(folder) / entry
    return (entry_dir if label_fraction is None else entry_dir / f"labels-{label_fraction!r}") / f"seed-{seed}"
