"""`kdpipe q-test`: does knowledge quality Q pick the teacher taps whose distillation gives the best student?

Transferability metrics (LogME, LEEP) are judged by the rank correlation of their score with the outcome; this is that
test for Q. Two kinds of runs, every one the feature method with the config's distill and probe settings:

- **Per tap**: each scored teacher tap alone, distilled into the *last* of the distill section's student layers,
  which is the layer the probe reads. Every run then trains and probes the same part of the same student, so the
  teacher tap is the only thing that changes. (Pairing by relative depth would also change which student layer is
  distilled and probed, confounding the tap with the student's depth.)
- **Per set**: k teacher taps (k = the number of student layers) paired one to one in depth order, as `distill` pairs
  Q's picks: Q's top k, the teacher's stage ends, `random_sets` random draws and Q's bottom k.

The predictors of the per-tap outcome are Q, its parts S, I and E, and depth (the generalized-layer index: "deeper is
better", the trivial predictor a metric must beat). For each: Spearman's rho and Kendall's tau between predictor and
mean probed top-1 over seeds, with percentile bootstrap 95 % intervals that resample the taps (scipy's `bootstrap`),
the tap it ranks first, and its regret (best tap's top-1 minus that tap's). Runs live in OUT/tap-<tap>/seed-<s> and
OUT/set-<set>/seed-<s>, and are reused or resumed as `kdpipe report`'s are.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.location import location
from cache.lock import lock_output
from cache.store import FeatureStore

from ..config import DistillConfig, QTestConfig
from ..distillation.pairing import teacher_stage_ends
from ..distillation.quality import rank_by_quality
from ..engine.runtime import write_args, write_bytes, write_json, write_png
from ..errors import UserError
from ..layout import (
    Q_TEST_PLOT,
    Q_TEST_SUMMARY,
    Q_TEST_TEXT,
    folder_lock,
    report_run,
    score_files,
)
from .report import Run, check_runs, execute, planned_run, shown_store

log = logging.getLogger(__name__)

PREDICTORS = ("Q", "S", "I", "E", "depth")
METHOD = "feature"


@dataclass(frozen=True)
class TapSet:
    """A set-level entry: its name (`q-top`, `stage-ends`, `random-2`, `q-bottom`) and teacher taps in depth order."""

    name: str
    taps: tuple[str, ...]


def q_test(config: QTestConfig) -> dict[str, Any]:
    """Plans every run (checked against the store first), runs or reuses each, writes q-test.md, q-test.json (and
    q-test.png) in `config.out` and returns the summary, holding the folder's lock throughout."""
    out = location(config.out)  # local: the option refuses object storage
    scored = read_scored_taps(config.store)
    student_layers = _student_layers(config)
    taps = _tested_taps(scored, config.taps)
    sets = tap_sets(scored, len(student_layers), teacher_stage_ends(_open(config.store)), config)
    seeds, probed = config.seeds, student_layers[-1:]
    tap_runs = [_run(config, f"tap-{tap['name']}", (tap["name"],), probed, s) for tap in taps for s in seeds]
    set_runs = [_run(config, f"set-{ts.name}", ts.taps, student_layers, s) for ts in sets for s in seeds]
    with lock_output(out, folder_lock(out), config.command):
        check_runs(tap_runs + set_runs)
        write_args(out, config)
        tap_results = execute(tap_runs, "q-test taps")
        set_results = execute(set_runs, "q-test sets")
        return write_q_test(out, taps, tap_results, sets, set_results, config)


def read_scored_taps(store: str) -> list[dict[str, Any]]:
    """The taps `kdpipe score` wrote beside the store, in depth order, each with S, I, E, Q and its index."""
    path = score_files(FeatureStore.locate(store))[0]
    if not path.is_file():
        raise UserError(f"{store} has no {path.name}; run `kdpipe score {store}` first")
    try:
        taps = json.loads(path.read_text())["taps"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a kdpipe score summary ({err})") from err
    return sorted(taps, key=lambda t: t["index"])


def _open(store: str) -> FeatureStore:
    return FeatureStore.open(FeatureStore.locate(store), mode="r")


def _student_layers(config: QTestConfig) -> tuple[str, ...]:
    layers = DistillConfig(**{**(config.distill or {}), "store": config.store}).student_layers
    if not layers:
        raise UserError(
            "q-test needs the distill section's student_layers: the per-tap runs distill into the last of them "
            "(the probed layer), the set runs pair as many teacher taps with them"
        )
    return layers


def _tested_taps(scored: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    known = {t["name"] for t in scored}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--taps: {unknown[0]!r} was not scored; the scores hold {', '.join(sorted(known))}")
    taps = [t for t in scored if not names or t["name"] in names]
    if len(taps) < 3:
        raise UserError(f"q-test needs at least 3 teacher taps to rank, got {len(taps)}")
    return taps


def tap_sets(scored: list[dict[str, Any]], k: int, stage_ends: list[str], config: QTestConfig) -> list[TapSet]:
    """The set-level entries over the scored taps: Q's top k, the k deepest stage ends, `random_sets` seeded random
    draws of k taps (without replacement, each in depth order) and Q's bottom k."""
    names = [t["name"] for t in scored]
    if k > len(names):
        raise UserError(f"{k} student layers need {k} teacher taps per set; {len(names)} were scored")
    by_q = rank_by_quality([_value(t["Q"]) for t in scored])
    sets = [TapSet("q-top", tuple(names[i] for i in sorted(by_q[:k])))]
    ends = [name for name in stage_ends if name in names][-k:]
    if len(ends) == k:
        sets.append(TapSet("stage-ends", tuple(ends)))
    rng = np.random.default_rng(config.seeds[0])
    for draw in range(1, config.random_sets + 1):
        sets.append(TapSet(f"random-{draw}", tuple(names[i] for i in sorted(rng.choice(len(names), k, replace=False)))))
    sets.append(TapSet("q-bottom", tuple(names[i] for i in sorted(by_q[-k:]))))
    return sets


def _run(config: QTestConfig, entry: str, teacher: tuple[str, ...], student: tuple[str, ...], seed: int) -> Run:
    own = {"method": METHOD, "teacher_layers": teacher, "student_layers": student}
    return planned_run(config, entry, seed, report_run(config.out, entry, seed), own)


def _value(x: float | None) -> float:
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def rank_agreement(predictor: list[float], outcome: list[float], resamples: int, seed: int) -> dict[str, Any]:
    """Spearman's rho and Kendall's tau of `predictor` against `outcome` over the taps where the predictor is finite,
    each with a percentile bootstrap 95 % interval over resampled taps (pairs kept together)."""
    from scipy import stats

    x, y = np.asarray(predictor, dtype=float), np.asarray(outcome, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    result: dict[str, Any] = {"taps": int(keep.sum())}
    for name, measure in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        value = float(measure(x, y).statistic)
        low = high = math.nan
        if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            interval = stats.bootstrap(
                (x, y),
                lambda a, b, measure=measure: measure(a, b).statistic,
                paired=True,
                vectorized=False,
                n_resamples=resamples,
                method="percentile",
                rng=np.random.default_rng(seed),
            ).confidence_interval
            low, high = float(interval.low), float(interval.high)
        result[name] = {"value": value, "low": low, "high": high}
    return result


def predictor_values(tap: dict[str, Any]) -> dict[str, float]:
    """What each predictor says of a scored tap (depth: its generalized-layer index)."""
    return {**{p: _value(tap[p]) for p in PREDICTORS if p != "depth"}, "depth": float(tap["index"])}


def top_pick(values: list[float]) -> int:
    """The position a predictor ranks first: its largest finite value, ties to the shallower tap."""
    finite = [i for i, v in enumerate(values) if not math.isnan(v)]
    return min(finite, key=lambda i: (-values[i], i))


def seed_stats(results: list[dict[str, Any]]) -> dict[str, Any]:
    top1 = [r["top1"] for r in sorted(results, key=lambda r: r["seed"])]
    return {
        "top1": top1,
        "seeds": sorted(r["seed"] for r in results),
        "mean": statistics.fmean(top1),
        "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
    }


def analyse(
    taps: list[dict], tap_results: list[dict], sets: list[TapSet], set_results: list[dict], config: QTestConfig
) -> dict[str, Any]:
    """The per-tap rows, each predictor's agreement with the outcome and regret, and the set rows."""
    rows = []
    for tap in taps:
        runs = [r for r in tap_results if r["method"] == f"tap-{tap['name']}"]
        rows.append({"tap": tap["name"], "index": tap["index"], **predictor_values(tap), **seed_stats(runs)})
    outcome = [r["mean"] for r in rows]
    best = max(range(len(rows)), key=lambda i: (outcome[i], -i))
    predictors = {}
    for name in PREDICTORS:
        values = [r[name] for r in rows]
        pick = top_pick(values)
        predictors[name] = {
            **rank_agreement(values, outcome, config.bootstrap, config.seeds[0]),
            "top_tap": rows[pick]["tap"],
            "top_tap_top1": outcome[pick],
            "regret": outcome[best] - outcome[pick],
        }
    set_rows = []
    for tap_set in sets:
        runs = [r for r in set_results if r["method"] == f"set-{tap_set.name}"]
        set_rows.append({"set": tap_set.name, "taps": list(tap_set.taps), **seed_stats(runs)})
    return {"taps": rows, "best_tap": rows[best]["tap"], "predictors": predictors, "sets": set_rows}


# ---------------------------------------------------------------------------------------------------------------
# Output


def write_q_test(
    out: Path, taps: list[dict], tap_results: list[dict], sets: list[TapSet], set_results: list[dict], config
) -> dict[str, Any]:
    analysis = analyse(taps, tap_results, sets, set_results, config)
    first = tap_results[0]
    store = shown_store(first["store"], out)
    setting = (
        f"{first['student']} students on `{first['dataset']}` from the store `{store}`, method `{METHOD}`: "
        f"{first['steps']} optimizer steps of batch {first['batch_size']} (peak LR {first['lr']}); "
        f"{first['num_labelled']} labelled train images for the probe (label fraction {first['label_fraction']:g}); "
        f"seeds {', '.join(map(str, config.seeds))}. Per tap: that teacher tap alone into the student's "
        f"{first['probe_tap']}, the probed layer. Per set: {len(analysis['sets'][0]['taps'])} teacher taps paired "
        f"in depth order with the student layers. Top-1 on the `{first['test_split']}` split "
        f"({first['num_test']} images). Intervals: percentile bootstrap over taps, {config.bootstrap} resamples."
    )
    parts = ["# kdpipe q-test: does Q pick the taps that transfer best?", "", setting, ""]
    parts += ["## Per tap", "", format_tap_table(analysis["taps"]), ""]
    parts += ["## Rank agreement with the probed top-1", "", format_predictor_table(analysis), ""]
    parts += [verdict(analysis), ""]
    parts += ["## Tap sets", "", format_set_table(analysis["sets"]), ""]
    if config.plot:
        plot_q_test(analysis, out / Q_TEST_PLOT)
        parts += [f"![each predictor against the probed top-1]({Q_TEST_PLOT})", ""]
    summary = {"stage": "q-test", "setting": setting, **analysis, "runs": tap_results + set_results}
    write_bytes(out / Q_TEST_TEXT, "\n".join(parts).encode())
    write_json(out / Q_TEST_SUMMARY, summary)
    return summary


def format_tap_table(rows: list[dict[str, Any]]) -> str:
    rank = {i: r + 1 for r, i in enumerate(rank_by_quality([row["Q"] for row in rows]))}
    lines = ["| tap | depth | Q (rank) | S | I | E | top-1 % (mean ± std) | per seed |", "|---" * 8 + "|"]
    for i, r in enumerate(rows):
        seeds = ", ".join(f"{t:.2f}" for t in r["top1"])
        lines.append(
            f"| {r['tap']} | {r['index']} | {r['Q']:.3f} ({rank[i]}) | {r['S']:.3f} | {r['I']:.3f} | {r['E']:.3f} | "
            f"{r['mean']:.2f} ± {r['std']:.2f} | {seeds} |"
        )
    return "\n".join(lines)


def format_predictor_table(analysis: dict[str, Any]) -> str:
    lines = [
        "| predictor | Spearman ρ [95 % CI] | Kendall τ [95 % CI] | ranks first | its top-1 % | regret (points) |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in analysis["predictors"].items():
        label = "depth (deeper is better)" if name == "depth" else name
        lines.append(
            f"| {label} | {_with_interval(p['spearman'])} | {_with_interval(p['kendall'])} | {p['top_tap']} | "
            f"{p['top_tap_top1']:.2f} | {p['regret']:.2f} |"
        )
    return "\n".join(lines)


def _with_interval(stat: dict[str, float]) -> str:
    return f"{stat['value']:+.2f} [{stat['low']:+.2f}, {stat['high']:+.2f}]"


def verdict(analysis: dict[str, Any]) -> str:
    """One plain sentence per question: does Q rank the taps, and does it beat depth."""
    q, depth = analysis["predictors"]["Q"], analysis["predictors"]["depth"]
    rho, rho_depth = q["spearman"], depth["spearman"]
    ranks = (
        "Q's ranking agrees with the outcome (the interval of ρ excludes 0)"
        if rho["low"] > 0
        else "Q's ranking does not reliably predict the outcome (the interval of ρ includes 0 or lies below it)"
    )
    beats = "beats" if rho["value"] > rho_depth["value"] else "does not beat"
    picks = "better" if q["regret"] < depth["regret"] else "no better" if q["regret"] == depth["regret"] else "worse"
    return (
        f"**{ranks}: ρ = {rho['value']:+.2f}. Q {beats} the trivial predictor depth (ρ = {rho_depth['value']:+.2f}).** "
        f"The best tap is {analysis['best_tap']}; Q's top tap {q['top_tap']} is {q['regret']:.2f} points behind it, "
        f"depth's top tap {depth['top_tap']} {depth['regret']:.2f}: as a pick of one tap, Q is {picks} than depth."
    )


def format_set_table(rows: list[dict[str, Any]]) -> str:
    q_top = next(r for r in rows if r["set"] == "q-top")
    lines = ["| set | teacher taps | top-1 % (mean ± std) | minus Q's top k |", "|---|---|---|---|"]
    for r in rows:
        gain = r["mean"] - q_top["mean"]
        lines.append(f"| {r['set']} | {', '.join(r['taps'])} | {r['mean']:.2f} ± {r['std']:.2f} | {gain:+.2f} |")
    return "\n".join(lines)


def plot_q_test(analysis: dict[str, Any], path: Path) -> None:
    """One panel per predictor: its value per tap against the probed top-1 (± std over seeds), taps named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = analysis["taps"]
    fig, axes = plt.subplots(1, len(PREDICTORS), figsize=(3.6 * len(PREDICTORS), 3.8), sharey=True)
    for ax, name in zip(axes, PREDICTORS, strict=True):
        x, y = [r[name] for r in rows], [r["mean"] for r in rows]
        ax.errorbar(x, y, yerr=[r["std"] for r in rows], fmt="o", color="tab:green" if name == "Q" else "tab:gray")
        for xi, yi, r in zip(x, y, rows, strict=True):
            ax.annotate(r["tap"], (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        rho = analysis["predictors"][name]["spearman"]
        ax.set_title(f"{name}: ρ = {rho['value']:+.2f} [{rho['low']:+.2f}, {rho['high']:+.2f}]", fontsize=9)
        ax.set_xlabel("generalized-layer index" if name == "depth" else name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probed top-1 (%)")
    fig.suptitle("each teacher tap distilled alone: predictor against the probed student's top-1")
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
