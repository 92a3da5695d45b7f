"""Every file name in kdpipe's output folders, in one place (the store's own layout is `cache.store`'s).

teach OUT/      model.safetensors  teach.json  teach_log.csv  teach_args.yaml
                epoch-NNN.safetensors + epoch-NNN.state.pt     (the two latest checkpoints, as distill's)
extract OUT/    features.zarr/  extract.json  extract_args.yaml
                scores.json  scores.png  score_args.yaml          (written by kdpipe score, beside the store)
distill OUT/    student.safetensors  distill.json  distill_log.csv  distill_args.yaml  labelled_indices.npy
                epoch-NNN.safetensors + epoch-NNN.state.pt     (the two latest checkpoints)
                probe.json  classifier.safetensors  probe_args.yaml  (written by kdpipe probe)
report OUT/     report.md  report.json  report.png  report_args.yaml  <method entry>/seed-<s>/ (a distill OUT)

Every file is written whole or not at all: NAME.tmp, synced, then renamed over NAME (`runtime.write_bytes`; zarr
writes the store's files alike).
"""

from __future__ import annotations

import re
from pathlib import Path

from cache.store import STORE_NAME as STORE_NAME  # an extract folder holds the store under this name

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


def args_file(folder: str | Path, command: str) -> Path:
    """The resolved options of a run (`<command>_args.yaml`, as timm's args.yaml)."""
    return Path(folder) / f"{command}_args.yaml"


def epoch_weights(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"epoch-{epoch:03d}.safetensors"


def epoch_state(folder: str | Path, epoch: int) -> Path:
    """Optimizer, schedule, RNG and log after `epoch`; written after its weights, so it commits them."""
    return Path(folder) / f"epoch-{epoch:03d}.state.pt"


def checkpoint_epochs(folder: str | Path) -> list[int]:
    """The epochs with a committed checkpoint in `folder` (none when it does not exist), in order."""
    found = (_EPOCH_STATE.search(p.name) for p in Path(folder).glob("epoch-*.state.pt"))
    return sorted(int(m.group(1)) for m in found if m)


def report_run(folder: str | Path, entry: str, seed: int) -> Path:
    """The distill folder of one report run."""
    return Path(folder) / entry / f"seed-{seed}"
