"""`kdpipe summary`: one table from the JSON summaries the stages left under an experiment folder."""

from __future__ import annotations

import json
from pathlib import Path

from .layout import PROBE_SUMMARY, SCORES, TEACH_SUMMARY


def _load(folder: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob(name))]


def summarize(folder: str | Path) -> str:
    folder = Path(folder)
    lines = []
    for teach in _load(folder, TEACH_SUMMARY):
        lines.append(f"teacher  {teach['model']:16s} {teach['test_split']} top-1 {teach['test_top1']:6.2f}%")
    for scores in _load(folder, SCORES):
        q = {t["name"]: t["Q"] for t in scores["taps"]}
        picks = ", ".join(f"{name} (Q {q[name]:.3f})" for name in scores["selected"])
        lines.append(f"taps     top-{scores['top_k']} by Q: {picks}")
    for probe in _load(folder, PROBE_SUMMARY):
        lines.append(
            f"student  {probe['model']:16s} {probe['test_split']} top-1 {probe['test_top1']:6.2f}%"
            f"  (feature-only distillation + linear probe on {probe['tap']})"
        )
    return "\n".join(lines) if lines else f"no stage summaries under {folder}"
