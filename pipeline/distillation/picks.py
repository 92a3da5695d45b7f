"""The taps `kdpipe score` picked, carried from the store it scored to a store that caches only them.

The two-pass route for a large dataset: `kdpipe extract --max-samples M` caches every tap of a sample, `kdpipe
score` picks the top k there (K uses the whole training split's size, docs/method.md quirk 8), then `kdpipe extract
--layers picked:PATH` caches only those taps, for every image. The second store records which scores chose its
taps (`picked_by`, beside its identity: the same taps chosen by other scores make the same store), and distill reads
its picks from there when the store was not scored itself.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cache.errors import StoreError
from cache.location import location
from cache.records import Picks, TeacherRecord
from cache.store import FeatureStore

from ..errors import UserError
from ..layout import SCORES, score_files
from ..models.taps import Tap, stage_ends

log = logging.getLogger(__name__)

PICKED = "picked:"  # --layers picked:PATH, the taps score picked in the store at PATH (or in its scores file)
STAGE_ENDS = "stage-ends"  # --layers stage-ends, the teacher's stage ends (what the baselines distill from)
TEACHER_KEYS = ("name", "checkpoint_sha256", "pretrained", "model_kwargs")  # the weights whose layers were scored


def expand_layers(entries: tuple[str, ...], taps: list[Tap]) -> tuple[list[str], Picks | None]:
    """The tap names `--layers` asks for, `picked:PATH` and `stage-ends` expanded (in the order given, each once),
    and the picks' record when `picked:` was among them."""
    names, picks = [], None
    for entry in entries:
        if entry.startswith(PICKED):
            if entry == PICKED:
                raise UserError(
                    f"--layers: {PICKED} names no path; give {PICKED}PATH, a scored store or its scores file"
                )
            if picks is not None:
                raise UserError(f"--layers: {PICKED}PATH is given twice; name one scored store")
            picks = read_picks(entry[len(PICKED) :])
            names += picks.selected
        elif entry == STAGE_ENDS:
            names += [t.name for t in stage_ends(taps)]
        else:
            names.append(entry)
    return list(dict.fromkeys(names)), picks


def read_picks(source: str) -> Picks:
    """What score recorded about its picks at `source`: a scored store (or its extract folder) or its scores file."""
    path = location(source)
    if path.is_file() or path.name.endswith(SCORES):  # a store is a folder
        try:
            summary = json.loads(path.read_text())
            return _record(summary["selected"], {t["name"]: t["Q"] for t in summary["taps"]}, summary, str(path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{PICKED}{source}: {path} is not a readable kdpipe scores file ({_reason(err)})") from None
    try:
        store = FeatureStore.open(path)
    except StoreError as err:
        raise UserError(f"{PICKED}{source}: {err}") from None
    scored = [store.split(s) for s in store.expected_splits() if store.split_created(s)]
    scores = next((p.record.scores for p in scored if p.record.scores), None)
    if scores is None:
        raise UserError(f"{PICKED}{source}: {store.path} was never scored; run `kdpipe score {source}` first")
    teacher = store.identity.teacher.to_json()
    context = {"teacher": {k: teacher.get(k) for k in TEACHER_KEYS}, "config_hash": store.provenance.config_hash}
    summary = {"seed": scores.seed, "top_k": scores.top_k, **context}
    return _record(scores.selected, scores.quality, summary, str(score_files(store.path)[0]))


def _reason(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"no {err} entry"
    return "not the layout kdpipe score writes" if isinstance(err, TypeError) else str(err)


def _record(selected: list[str], q: dict[str, float | None], summary: dict[str, Any], source: str) -> Picks:
    teacher = summary["teacher"]
    teacher = teacher if isinstance(teacher, dict) else {"name": teacher}  # a scores file names it only
    return Picks(list(selected), q, summary["seed"], summary["top_k"], source, summary.get("config_hash"), teacher)


def check_teacher(picks: Picks, record: TeacherRecord) -> None:
    """Picks apply to the teacher they were scored on: its name and, where the picks recorded them, its weights."""
    teacher = record.to_json()
    differ = [k for k, v in picks.teacher.items() if teacher.get(k) != v]
    if differ:
        raise UserError(
            f"{PICKED}{picks.source}: the picks were scored on another teacher ({differ[0]} "
            f"{picks.teacher[differ[0]]!r}, here {teacher.get(differ[0])!r}); score this teacher's sample first"
        )


def store_picks(store: FeatureStore, scores: Picks | None) -> Picks | None:
    """The scores that pick a store's taps: its own (`scores`, a split's record) or those that chose what it caches."""
    return scores or store.provenance.picked_by
