"""`kdpipe summary`: one table from the JSON summaries the stages left under an experiment folder.

Scores are shown only while they describe the store beside them: a scores file whose store is gone, unreadable, or
was rebuilt with another configuration since (its config hash differs) is listed as stale instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from cache.store import FeatureStore, StoreError

from .layout import PROBE_SUMMARY, SCORES, TEACH_SUMMARY


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
    if scores["config_hash"] != store.meta.get("config_hash"):
        return "its store was rebuilt with another configuration since"
    return None


def summarize(folder: str | Path) -> str:
    folder = Path(folder)
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
    for probe in _load(folder, PROBE_SUMMARY):
        lines.append(
            f"student  {probe['model']:16s} {probe['test_split']} top-1 {probe['test_top1']:6.2f}%"
            f"  (feature-only distillation + linear probe on {probe['tap']})"
        )
    return "\n".join(lines) if lines else f"no stage summaries under {folder}"
