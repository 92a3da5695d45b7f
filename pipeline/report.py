"""`kdpipe report`: every method over several seeds against one feature store, as in the paper's comparison.

A compared entry is a method, optionally with distill flags joined by `+`: `feature+no-unlabelled-distill` is the
feature method distilled on the labelled subset only. Runs live in OUT/<entry>/seed-<s>. A run with checkpoints
is resumed, which reuses a finished run as it is (and refuses one made with other settings); a probe is refitted
when its student is newer or its settings changed. Every run takes the config's distill and probe settings, with
the report's store, the entry's method and flags, the seed, its own folder and (when given) the report's device on
top. Accuracy is each run's last-epoch top-1 on the held-out split (METHOD.md §7): the student's own classifier for
methods whose losses trained it (ce, kd), the linear probe for feature-only methods.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cache.lock import OutputLock

from .config import Boolean, DistillConfig, ProbeConfig, ReportConfig, field_types
from .distill import distill
from .errors import UserError
from .layout import (
    DISTILL_SUMMARY,
    PROBE_SUMMARY,
    REPORT_PLOT,
    REPORT_SUMMARY,
    REPORT_TEXT,
    STUDENT_WEIGHTS,
    checkpoint_epochs,
    folder_lock,
    report_run,
)
from .methods import format_terms, get_method
from .probe import probe
from .runtime import progress, write_args, write_bytes, write_json, write_png

log = logging.getLogger(__name__)

BASELINE = "ce"
RECIPE = ("student", "steps", "batch_size", "lr", "label_fraction", "num_labelled")  # shared by every run


@dataclass(frozen=True)
class Run:
    """One (entry, seed) of a report: its folder and the distill and probe configs it runs with."""

    entry: str
    seed: int
    folder: Path
    distill: DistillConfig
    probe: ProbeConfig


def report(config: ReportConfig) -> dict[str, Any]:
    """Checks every (entry, seed) against the store first (a setting that fails fails before hours of runs), then
    runs or reuses each, writes report.md, report.json (and report.png) in `config.out` and returns the summary.
    The report holds its folder's lock throughout (each run, its own folder's too)."""
    runs = plan(config)
    out = Path(config.out)
    with OutputLock(out, folder_lock(out), config.command):
        return _report(config, runs, out)


def _report(config: ReportConfig, runs: list[Run], out: Path) -> dict[str, Any]:
    for run in progress(runs, desc="check", unit="run", leave=False):
        distill(replace(run.distill, check=True))
    write_args(out, config)
    results = []
    bar = progress(runs, desc="report", unit="run")
    for run in bar:
        bar.set_postfix(method=run.entry, seed=run.seed)
        trained = distill(run.distill)
        if trained["evaluated_with"] == "linear probe" and not _probe_is_current(run.folder, run.probe):
            probe(run.probe)
        results.append(run_result(run.folder, run.entry))
        result = results[-1]
        on_tap = f" on {result['probe_tap']}" if result["probe_tap"] else ""
        log.info(
            "%s seed %d: top-1 %.2f%% (%s%s)", run.entry, run.seed, result["top1"], result["evaluated_with"], on_tap
        )
    return write_report(out, results, list(dict.fromkeys(config.methods)), config.plot)


def plan(config: ReportConfig) -> list[Run]:
    """Every run of the report, each entry's method and flags checked: the config's distill and probe settings,
    with the report's store, device, the entry's method and flags, the seed and the run's folder on top. A run with
    checkpoints is resumed (a finished one is returned as it is; one made with other settings is refused)."""
    if not config.methods:
        raise UserError("--methods names no method")
    runs = []
    for entry in dict.fromkeys(config.methods):  # an entry or seed given twice is one run
        method, flags = split_entry(entry)
        for seed in dict.fromkeys(config.seeds):
            folder = report_run(config.out, entry, seed)
            shared = {"seed": seed, **({"device": config.device} if config.device else {})}
            own = {"store": config.store, "method": method, "out": str(folder), "check": False}
            resume = bool(checkpoint_epochs(folder))
            distill_config = DistillConfig(**{**(config.distill or {}), **flags, **shared, **own, "resume": resume})
            probe_config = ProbeConfig(**{**(config.probe or {}), **shared, "run": str(folder)})
            runs.append(Run(entry, seed, folder, distill_config, probe_config))
    return runs


def entry_flags() -> dict[str, bool]:
    """The distill flags an entry may add (`+no-unlabelled-distill`), each with the value it sets: the on/off run
    settings, and their `no-` forms where the option has one."""
    kinds, flags = field_types(DistillConfig), {}
    for f in fields(DistillConfig):
        if f.metadata["spec"] and isinstance(kinds[f.name], Boolean):
            flags[f.name.replace("_", "-")] = True
            if f.metadata["negatable"]:
                flags["no-" + f.name.replace("_", "-")] = False
    return flags


def split_entry(entry: str) -> tuple[str, dict[str, bool]]:
    """`feature+no-unlabelled-distill` -> ("feature", {"unlabelled_distill": False}); the method must exist."""
    method, *flags = entry.split("+")
    get_method(method)
    allowed = entry_flags()
    unknown = [flag for flag in flags if flag not in allowed]
    if unknown:
        raise UserError(
            f"--methods: --{unknown[0]} is not a flag of kdpipe distill that an entry may add ({', '.join(allowed)})"
        )
    return method, {flag.removeprefix("no-").replace("-", "_"): allowed[flag] for flag in flags}


def _probe_is_current(run_dir: Path, config: ProbeConfig) -> bool:
    """A probe fitted after its student was last written, with the settings the report would use now."""
    probe_file = run_dir / PROBE_SUMMARY
    if not probe_file.is_file() or probe_file.stat().st_mtime < (run_dir / STUDENT_WEIGHTS).stat().st_mtime:
        return False
    fitted = json.loads(probe_file.read_text())
    return (
        fitted.get("max_iter") == config.max_iter
        and fitted["seed"] == config.seed
        and config.tap in (None, fitted["tap"])
    )


def run_result(run_dir: Path, entry: str) -> dict[str, Any]:
    """One run's entry, seed, held-out top-1 and how it was evaluated, from its JSON summaries."""
    run = json.loads((run_dir / DISTILL_SUMMARY).read_text())
    own_head = run["evaluated_with"] == "own classifier"
    evaluation = run if own_head else json.loads((run_dir / PROBE_SUMMARY).read_text())
    keys = ("seed", "student", "dataset", "store", "teacher_taps", "losses", "steps", "batch_size", "lr")
    keys += ("label_fraction", "num_labelled", "num_training_rows")
    return {
        "method": entry,
        **{k: run[k] for k in keys},
        "top1": evaluation["test_top1"],
        "test_split": evaluation["test_split"],
        "num_test": evaluation["num_test"],
        "evaluated_with": run["evaluated_with"],
        "probe_tap": None if own_head else evaluation["tap"],
    }


def aggregate(results: list[dict], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: top-1 mean ± std over seeds and the mean paired gain over the CE-only student (same seeds)."""
    by_method = {m: {r["seed"]: r for r in results if r["method"] == m} for m in methods}
    baseline = by_method.get(BASELINE, {})
    rows = []
    for method in methods:
        runs = by_method[method]
        top1 = [r["top1"] for r in runs.values()]
        gains = [r["top1"] - baseline[s]["top1"] for s, r in runs.items() if s in baseline]
        first = next(iter(runs.values()))
        rows.append(
            {
                "method": method,
                "losses": first["losses"],
                "teacher_taps": first["teacher_taps"],
                "evaluated_with": first["evaluated_with"],
                "num_training_rows": first["num_training_rows"],
                "runs": len(top1),
                "top1": top1,
                "mean": statistics.fmean(top1),
                "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "gain": statistics.fmean(gains) if gains else None,
                "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The report's Markdown table: method, losses, teacher taps, training rows, top-1 mean ± std, gain over ce."""
    lines = [
        "| method | losses | teacher taps | trained on | evaluated with | top-1 % (mean ± std) | gain over ce |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gain = "—" if r["gain"] is None else f"{r['gain']:+.2f} ± {r['gain_std']:.2f}"
        taps = ", ".join(r["teacher_taps"]) or "—"
        lines.append(
            f"| {r['method']} | {format_terms(r['losses'])} | {taps} | {r['num_training_rows']} images | "
            f"{r['evaluated_with']} | {r['mean']:.2f} ± {r['std']:.2f} (n={r['runs']}) | {gain} |"
        )
    return "\n".join(lines)


def tap_overlap_note(rows: list[dict[str, Any]]) -> str | None:
    """Says how far the Q-picked and the stage-end teacher taps coincide (they can, e.g. when Q peaks late)."""
    taps = {r["method"]: r["teacher_taps"] for r in rows}
    picked, standard = taps.get("feature"), taps.get("feature-standard") or taps.get("fitnet")
    if not picked or not standard:
        return None
    shared = [t for t in picked if t in standard]
    return (
        f"Q-picked taps ({', '.join(picked)}) and stage-end taps ({', '.join(standard)}) share "
        f"{len(shared)} of {len(picked)}" + (f" ({', '.join(shared)})" if shared else "") + "; the difference "
        "between `feature` and `feature-standard` measures the layer choice only where they differ."
    )


def write_report(out: Path, results: list[dict], methods: list[str], plot: bool = True) -> dict[str, Any]:
    """report.md, report.json (and report.png) in `out`; returns the JSON summary."""
    rows = aggregate(results, methods)
    first = results[0]
    seeds = sorted({r["seed"] for r in results})
    differing = recipe_differences(results)
    setting = (
        f"{first['student']} students on `{first['dataset']}` from the store `{first['store']}`: "
        f"{first['steps']} optimizer steps of batch {first['batch_size']} (peak LR {first['lr']}) for every "
        f"method; {first['num_labelled']} labelled train images (label fraction {first['label_fraction']:g}); "
        f"seeds {', '.join(map(str, seeds))}. Top-1 is each run's last-epoch accuracy on the `{first['test_split']}` "
        f"split ({first['num_test']} images: one image is {100 / first['num_test']:.2f} points), evaluated once; "
        "the gain is the mean over seeds of (method − ce) on the same seed, ± the std of those differences."
    )
    if differing:
        setting = f"**Not one recipe: {differing}.** Set them in the config's `distill` section. " + setting
    note = tap_overlap_note(rows)
    parts = ["# kdpipe report", "", setting, "", format_table(rows), ""]
    parts += [note, ""] if note else []
    parts += ["## Per seed (top-1 %)", "", per_seed_table(results, methods, seeds), ""]
    if plot:
        plot_report(rows, out / REPORT_PLOT)
        parts += [f"![top-1 relative to the CE-only student]({REPORT_PLOT})", ""]
    write_bytes(out / REPORT_TEXT, "\n".join(parts).encode())
    summary = {"stage": "report", "setting": setting, "seeds": seeds, "methods": rows, "runs": results, "note": note}
    write_json(out / REPORT_SUMMARY, summary)
    return summary


def per_seed_table(results: list[dict], methods: list[str], seeds: list[int]) -> str:
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for method in methods:
        by_seed = {r["seed"]: r["top1"] for r in results if r["method"] == method}
        lines.append(f"| {method} | " + " | ".join(f"{by_seed[s]:.2f}" for s in seeds) + " |")
    return "\n".join(lines)


def recipe_differences(results: list[dict]) -> str:
    """The recipe settings that differ between runs, with each entry's values ("" when all runs share them)."""
    parts = []
    for key in RECIPE:
        by_entry = {r["method"]: r[key] for r in results}
        if len({json.dumps(v) for v in by_entry.values()}) > 1:
            parts.append(f"{key} differs ({', '.join(f'{m} {v}' for m, v in by_entry.items())})")
    return "; ".join(parts)


def plot_report(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of top-1 gain over the CE-only student (±std over seeds), or of top-1 itself without a ce run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = all(r["gain"] is not None for r in rows) and any(r["method"] == BASELINE for r in rows)
    shown = [r for r in rows if r["method"] != BASELINE] if relative else rows
    values = [r["gain"] if relative else r["mean"] for r in shown]
    errors = [r["gain_std"] if relative else r["std"] for r in shown]
    fig, ax = plt.subplots(figsize=(1.4 * len(shown) + 2, 3.5))
    colors = ["tab:green" if r["method"].startswith("feature") else "tab:gray" for r in shown]
    ax.bar([r["method"] for r in shown], values, yerr=errors, capsize=4, color=colors)
    if relative:
        baseline = next(r for r in rows if r["method"] == BASELINE)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"top-1 gain over ce (points)\nce = {baseline['mean']:.2f}%")
    else:
        ax.set_ylabel("top-1 (%)")
    ax.set_title("feature-only (green) vs logit-based students, mean ± std over seeds")
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
