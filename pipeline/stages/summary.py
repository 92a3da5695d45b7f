"""`kdpipe summary`: one table from the JSON summaries the stages left under an experiment folder.

Scores are shown only while they describe the store beside them: a scores file whose store is gone, unreadable, or
was rebuilt with another configuration since (its config hash differs) is listed as stale instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from cache.errors import StoreError
from cache.location import local_folder
from cache.store import FeatureStore

from ..layout import DISTILL_SUMMARY, PROBE_SUMMARY, SCORES, TEACH_SUMMARY


def _load(folder: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob(name))]


def _scores_files(folder: Path) -> list[Path]:
    """scores.json, and NAME.scores.json of stores with another name (`layout.beside_store`)."""
    return sorted(p for p in folder.rglob(f"*{SCORES}") if p.name == SCORES or p.name.endswith(f".{SCORES}"))


def _stale_reason(scores_file: Path, scores: dict) -> str | None:
    """Why a scores file no longer describes the store beside it; None while it does."""
    try:
        store = FeatureStore.open(scores_file.parent / Path(scores["store"]).name)
    except StoreError as err:
        return f"its store cannot be read: {err}"
    if "config_hash" not in scores:
        return "written before kdpipe recorded which store it scored"
    if scores["config_hash"] != store.provenance.config_hash:
        return "its store was rebuilt with another configuration since"
    return None


def summarize(folder: str | Path) -> str:
    folder = local_folder(folder, "summary")
    lines = []
    for teach in _load(folder, TEACH_SUMMARY):
        lines.append(f"teacher  {teach['model']:16s} {teach['test_split']} top-1 {teach['test_top1']:6.2f}%")
    for path in _scores_files(folder):
        scores = json.loads(path.read_text())
        stale = _stale_reason(path, scores)
        if stale:
            lines.append(f"taps     {path} is stale ({stale}); rerun kdpipe score")
            continue
        q = {t["name"]: t["Q"] for t in scores["taps"]}
        picks = ", ".join(f"{name} (Q {q[name]:.3f})" for name in scores["selected"])
        lines.append(f"taps     top-{scores['top_k']} by Q: {picks}")
    lines += [_student_line(path.parent) for path in sorted(folder.rglob(DISTILL_SUMMARY))]
    return "\n".join(line for line in lines if line) or f"no stage summaries under {folder}"


def _student_line(run: Path) -> str | None:
    """A distilled student's test top-1: its probe's, or its own classifier's for a method that trained one; None
    for a feature-only run not probed yet."""
    trained = json.loads((run / DISTILL_SUMMARY).read_text())
    method = trained.get("method", "feature")
    if (run / PROBE_SUMMARY).exists():
        result = json.loads((run / PROBE_SUMMARY).read_text())
        how = f"linear probe on {result['tap']}"
        how = f"feature-only distillation + {how}" if method == "feature" else f"{method}, {how}"
    elif "test_top1" in trained:
        result, how = trained, f"{method}, its own classifier"
    else:
        return None
    return f"student  {trained['student']:16s} {result['test_split']} top-1 {result['test_top1']:6.2f}%  ({how})"
