"""`kdpipe study FILE`: every stage a config file has a section for, in pipeline order, in one resumable command.

teach -> extract -> score -> q-test -> report, each with its section of FILE (and the shared top-level keys), so one
YAML is one experiment. Each stage continues or reuses what an earlier, interrupted or finished, study left:

- teach resumes from its last epoch checkpoint, and a finished teacher is reused (a different recipe is refused);
- extract resumes the store block by block, and leaves a complete one alone (a different configuration is refused);
- score runs again only when the store or the score settings changed since its scores were written;
- report and q-test reuse finished runs, resume interrupted ones and rewrite their tables from the runs' summaries.

So a killed study, run again, ends with the same results as one never interrupted (the stages' own guarantees).
score scores the extract section's store; report and q-test name their store in their sections.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

import yaml

from cache.store import FeatureStore

from ..config import ExtractConfig, QTestConfig, ReportConfig, ScoreConfig, TeachConfig, load_config, resolve
from ..errors import UserError
from ..layout import checkpoint_epochs, score_files

log = logging.getLogger(__name__)

STAGES = ("teach", "extract", "score", "q-test", "report")  # pipeline order; a study runs those FILE has sections for


def study(path: str) -> dict[str, Any]:
    """Runs (or continues) the stages of the config file at `path`; returns each stage's summary and wall time."""
    sections = [stage for stage in STAGES if stage in load_config(path)]
    if not sections:
        raise UserError(f"{path} has no stage section ({', '.join(STAGES)}); a study runs those it has")
    store = resolve(ExtractConfig, path).out if "extract" in sections else None
    done: dict[str, Any] = {}
    for stage in sections:
        start = time.perf_counter()
        log.info("study: %s", stage)
        summary = STAGE_RUNNERS[stage](path, store)
        done[stage] = {"summary": summary, "seconds": round(time.perf_counter() - start, 1)}
        log.info("study: %s done in %.0f s", stage, done[stage]["seconds"])
    return done


def _teach(path: str, store: str | None) -> dict[str, Any]:
    from .teach import teach

    config = resolve(TeachConfig, path)
    return teach(replace(config, resume=bool(checkpoint_epochs(config.out))))


def _extract(path: str, store: str | None) -> dict[str, Any]:
    from .extract import extract

    return extract(resolve(ExtractConfig, path))


def _score(path: str, store: str | None) -> dict[str, Any]:
    from .score import score

    if store is None:
        raise UserError(f"{path}: a score section needs the extract section whose store it scores")
    config = resolve(ScoreConfig, path, {"store": store})
    current = current_scores(config)
    if current is not None:
        log.info("study: the scores of %s are current; reused", store)
        return current
    return score(config)


def current_scores(config: ScoreConfig) -> dict[str, Any] | None:
    """The scores beside the store when they were written for its present content with the same settings. score
    writes its settings first and its scores last, so settings newer than the scores are a run that did not finish
    (the scores beside them an older run's)."""
    store = FeatureStore.locate(config.store)
    scores_file, _, args_file = score_files(store)
    if not scores_file.is_file() or not args_file.is_file():
        return None
    if args_file.stat().st_mtime_ns > scores_file.stat().st_mtime_ns:
        return None
    summary = json.loads(scores_file.read_text())
    written_with = yaml.safe_load(args_file.read_text())
    config_hash = FeatureStore.open(store, mode="r").provenance.config_hash
    return summary if summary.get("config_hash") == config_hash and written_with == config.to_dict() else None


def _report(path: str, store: str | None) -> dict[str, Any]:
    from .report import report

    return report(resolve(ReportConfig, path))


def _q_test(path: str, store: str | None) -> dict[str, Any]:
    from .qtest import q_test

    return q_test(resolve(QTestConfig, path))


STAGE_RUNNERS = {"teach": _teach, "extract": _extract, "score": _score, "report": _report, "q-test": _q_test}
