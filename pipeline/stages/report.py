"""`kdpipe report`: every method over several seeds against one feature store, as in the paper's comparison.

A compared entry is a method, optionally with distill flags joined by `+`: `feature+no-unlabelled-distill` is the
feature method distilled on the labelled subset only. Runs live in OUT/<entry>/seed-<s>; with `label_fractions`
(a label budget sweep) every entry and seed also runs at each fraction, in OUT/<entry>/labels-<fraction>/seed-<s>
except at the distill section's own fraction, whose runs are the main table's. A run with checkpoints
is resumed, which reuses a finished run as it is (and refuses one made with other settings); a probe is refitted
when its student is newer or its settings changed. Every run takes the config's distill and probe settings, with
the report's store, the entry's method and flags, the seed, its label fraction, its own folder and (when given) the
report's device on top. Accuracy is each run's last-epoch top-1 on the held-out split (docs/method.md §7): the student's
own classifier for methods whose losses trained it (ce, kd), the linear probe for feature-only methods.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from cache.location import is_url, location
from cache.lock import lock_output

from ..config import Boolean, DistillConfig, ProbeConfig, ReportConfig, field_types
from ..distillation.methods import format_terms, get_method
from ..engine.runtime import progress, write_args, write_bytes, write_json, write_png
from ..errors import UserError, styled
from ..layout import (
    DISTILL_SUMMARY,
    PROBE_SUMMARY,
    REPORT_BUDGET_PLOT,
    REPORT_PLOT,
    REPORT_SUMMARY,
    REPORT_TEXT,
    STUDENT_WEIGHTS,
    checkpoint_epochs,
    folder_lock,
    report_run,
)
from .distill import distill
from .probe import probe

log = logging.getLogger(__name__)

BASELINE = "ce"
RECIPE = ("student", "steps", "batch_size", "lr", "label_fraction", "num_labelled")  # shared by every run
REPORT_MIN_WIDTH = 5.5  # inches: report.png's title over a single bar
DODGE_DECADES = 0.012  # how far apart on the log axis of fractions the budget plot sets its entries
MARKERS = "osD^vP*X"


@dataclass(frozen=True)
class Run:
    """One (entry, seed) of a report at one label fraction: its folder and the distill and probe configs it runs
    with. `main`: at the distill section's label fraction (the main table's run)."""

    entry: str
    seed: int
    folder: Path
    distill: DistillConfig
    probe: ProbeConfig
    main: bool = True

    @property
    def label_fraction(self) -> float:
        return self.distill.label_fraction


def report(config: ReportConfig) -> dict[str, Any]:
    """Checks every (entry, seed) against the store first (a setting that fails fails before hours of runs), then
    runs or reuses each, writes report.md, report.json (and report.png) in `config.out` and returns the summary.
    The report holds its folder's lock throughout (each run, its own folder's too)."""
    out = location(config.out)  # local: the option refuses object storage
    runs = plan(config)
    with lock_output(out, folder_lock(out), config.command):
        return _report(config, runs, out)


def _report(config: ReportConfig, runs: list[Run], out: Path) -> dict[str, Any]:
    check_runs(runs)
    write_args(out, config)
    results = execute(runs, "report")
    main = [r for run, r in zip(runs, results, strict=True) if run.main]
    fractions = sweep_fractions(config)
    swept = [r for run, r in zip(runs, results, strict=True) if run.label_fraction in fractions]
    return write_report(out, main, list(dict.fromkeys(config.methods)), config.plot, swept)


def check_runs(runs: list[Run]) -> None:
    """Every run's settings against the store and its folder, before any run trains."""
    for run in progress(runs, desc="check", unit="run", leave=False):
        _check(run)


def execute(runs: list[Run], desc: str) -> list[dict[str, Any]]:
    """Runs (or reuses) each run in order, probing the feature-only ones; their `run_result`s."""
    results = []
    bar = progress(runs, desc=desc, unit="run")
    for run in bar:
        bar.set_postfix(method=run.entry, seed=run.seed, labels=f"{run.label_fraction:g}")
        trained = distill(run.distill)
        if trained["evaluated_with"] == "linear probe" and not _probe_is_current(run.folder, run.probe):
            probe(run.probe)
        results.append(run_result(run.folder, run.entry))
        result = results[-1]
        on_tap = f" on {result['probe_tap']}" if result["probe_tap"] else ""
        log.info(
            "%s seed %d, label fraction %g: top-1 %.2f%% (%s%s)",
            *(run.entry, run.seed, run.label_fraction, result["top1"], result["evaluated_with"], on_tap),
        )
    return results


def _check(run: Run) -> None:
    """The run's settings against the store and its folder, without training; a run of the sweep that fails is
    named by its --label-fractions value, entry and seed."""
    try:
        distill(replace(run.distill, check=True))
    except UserError as err:
        if run.main:
            raise
        reason = str(err).removeprefix(styled(f"--label-fraction={run.label_fraction:g}: "))
        raise UserError(f"--label-fractions={run.label_fraction:g} ({run.entry}, seed {run.seed}): {reason}") from None


def sweep_fractions(config: ReportConfig) -> list[float]:
    """The label fractions of the sweep, ascending (none without `label_fractions`)."""
    return sorted(set(config.label_fractions or ()))


def plan(config: ReportConfig) -> list[Run]:
    """Every run of the report, each entry's method and flags checked: the config's distill and probe settings,
    with the report's store, device, the entry's method and flags, the seed, the label fraction and the run's folder
    on top. The main runs (at the distill section's label fraction) come first, then those of each other fraction of
    the sweep. A run with checkpoints is resumed (a finished one is returned as it is; one made with other settings
    is refused)."""
    if not config.methods:
        raise UserError("--methods names no method")
    settings = {**(config.distill or {}), "store": config.store}
    main_fraction = DistillConfig(**settings).label_fraction
    runs = []
    for fraction in [main_fraction, *(f for f in sweep_fractions(config) if f != main_fraction)]:
        for entry in dict.fromkeys(config.methods):  # an entry or seed given twice is one run
            method, flags = split_entry(entry)
            for seed in dict.fromkeys(config.seeds):
                main = fraction == main_fraction
                folder = report_run(config.out, entry, seed, None if main else fraction)
                own = {**flags, "method": method, "label_fraction": fraction}
                runs.append(planned_run(config, entry, seed, folder, own, main))
    return runs


def planned_run(config, entry: str, seed: int, folder: Path, own: dict[str, Any], main: bool = True) -> Run:
    """One run of a command that runs many against one store (report, q-test: `config` has store, device, distill
    and probe): the distill and probe sections, with the store, the seed, the device (when given), the run's own
    settings `own` and its folder on top; resumed when the folder has checkpoints."""
    shared = {"seed": seed, **({"device": config.device} if config.device else {})}
    settings = {**(config.distill or {}), "store": config.store, **own, **shared, "out": str(folder), "check": False}
    distill_config = DistillConfig(**settings, resume=bool(checkpoint_epochs(folder)))
    probe_config = ProbeConfig(**{**(config.probe or {}), **shared, "run": str(folder)})
    return Run(entry, seed, folder, distill_config, probe_config, main)


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
            f"--methods: `kdpipe distill --{unknown[0]}` is not a flag an entry may add ({', '.join(allowed)})"
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
        # Block-KD joins its stones at teacher taps it runs through online rather than reads from the cache
        "teacher_taps": run["teacher_taps"] or [stone["teacher"] for stone in run.get("stones", [])],
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


def write_report(
    out: Path, results: list[dict], methods: list[str], plot: bool = True, swept: list[dict] | None = None
) -> dict[str, Any]:
    """report.md, report.json (and report.png) in `out` from the main runs' `results`; with the runs of a label
    budget sweep (`swept`, every fraction's), its section, its JSON and report_budget.png too. Returns the JSON
    summary."""
    rows = aggregate(results, methods)
    first = results[0]
    seeds = sorted({r["seed"] for r in results})
    differing = recipe_differences(results)
    setting = (
        f"{first['student']} students on `{first['dataset']}` from the store `{shown_store(first['store'], out)}`: "
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
        write_png(out / REPORT_PLOT, report_figure(rows))
        parts += [f"![top-1 relative to the CE-only student]({REPORT_PLOT})", ""]
    summary = {"stage": "report", "setting": setting, "seeds": seeds, "methods": rows, "runs": results, "note": note}
    if swept:
        tables = budget_tables(swept, methods)
        main_fraction = first["label_fraction"]
        parts += ["## Label budget", "", budget_setting(tables, main_fraction), "", format_budget_table(tables), ""]
        for table in tables:
            parts += [f"### {_fraction_heading(table)}", ""]
            parts += [f"**Not one recipe: {table['differing']}.**", ""] if table["differing"] else []
            parts += [format_table(table["methods"]), ""]
        if plot:
            write_png(out / REPORT_BUDGET_PLOT, budget_figure(tables))
            parts += [f"![top-1 against the label fraction]({REPORT_BUDGET_PLOT})", ""]
        summary["sweep"] = {
            "label_fractions": [t["label_fraction"] for t in tables],
            "main_label_fraction": main_fraction,
            "fractions": tables,
            "runs": swept,
        }
    write_bytes(out / REPORT_TEXT, "\n".join(parts).encode())
    write_json(out / REPORT_SUMMARY, summary)
    return summary


def shown_store(store: str, out: Path) -> str:
    """A run's store (recorded absolute) as a report names it: relative to the report's folder, so that the text
    names no machine's folders and still leads to the store when both move together; a URL as it is."""
    return store if is_url(store) else os.path.relpath(store, os.path.realpath(out))


def budget_tables(swept: list[dict], methods: list[str]) -> list[dict[str, Any]]:
    """Per label fraction of the sweep, ascending: its labelled image count, the recipe settings its runs do not
    share ("" when none) and its method rows (`aggregate`: top-1 mean ± std, gain over ce)."""
    tables = []
    for fraction in sorted({r["label_fraction"] for r in swept}):
        results = [r for r in swept if r["label_fraction"] == fraction]
        tables.append(
            {
                "label_fraction": fraction,
                "num_labelled": results[0]["num_labelled"],
                "differing": recipe_differences(results),
                "methods": aggregate(results, methods),
            }
        )
    return tables


def budget_setting(tables: list[dict[str, Any]], main_fraction: float) -> str:
    """What the sweep's tables hold, and which of its runs are the main table's."""
    fractions = ", ".join(f"{t['label_fraction']:g}" for t in tables)
    shared = any(t["label_fraction"] == main_fraction for t in tables)
    return (
        f"Every method and seed at each label fraction of the train split ({fractions}), the recipe otherwise as "
        "above (the same number of optimizer steps at every fraction); cells are top-1 % mean ± std over seeds."
        + (f" The runs at {main_fraction:g} are the main table's." if shared else "")
    )


def format_budget_table(tables: list[dict[str, Any]]) -> str:
    """Methods by label fraction: one row per method, one column per fraction, cells top-1 mean ± std."""
    methods, cells = [r["method"] for r in tables[0]["methods"]], _cells(tables)
    header = " | ".join(f"{t['label_fraction']:g} ({t['num_labelled']} labelled)" for t in tables)
    lines = [f"| method | {header} |", "|---|" + "---|" * len(tables)]
    for method in methods:
        row = [cells[t["label_fraction"], method] for t in tables]
        lines.append(f"| {method} | " + " | ".join(f"{r['mean']:.2f} ± {r['std']:.2f}" for r in row) + " |")
    return "\n".join(lines)


def _cells(tables: list[dict[str, Any]]) -> dict[tuple[float, str], dict[str, Any]]:
    """The sweep's method rows by (label fraction, method entry)."""
    return {(t["label_fraction"], r["method"]): r for t in tables for r in t["methods"]}


def _fraction_heading(table: dict[str, Any]) -> str:
    return f"Label fraction {table['label_fraction']:g}: {table['num_labelled']} labelled train images"


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


def report_figure(rows: list[dict[str, Any]]) -> Figure:
    """Bars of top-1 gain over the CE-only student (±std over seeds), or of top-1 itself without a ce run; at least
    REPORT_MIN_WIDTH inches wide, so that the title fits over a single bar."""
    relative = all(r["gain"] is not None for r in rows) and any(r["method"] == BASELINE for r in rows)
    shown = [r for r in rows if r["method"] != BASELINE] if relative else rows
    values = [r["gain"] if relative else r["mean"] for r in shown]
    errors = [r["gain_std"] if relative else r["std"] for r in shown]
    figure = Figure(figsize=(max(REPORT_MIN_WIDTH, 1.4 * len(shown) + 2), 3.8), layout="constrained")
    ax = figure.subplots()
    colors = ["tab:green" if feature_only(r) else "tab:gray" for r in shown]
    ax.bar([r["method"] for r in shown], values, yerr=errors, capsize=4, color=colors)
    if relative:
        baseline = next(r for r in rows if r["method"] == BASELINE)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"top-1 gain over ce (points)\nce = {baseline['mean']:.2f}%")
    else:
        ax.set_ylabel("top-1 (%)")
    ax.set_title("feature-only (green) vs logit-based students\nmean ± std over seeds")
    return figure


def feature_only(row: dict[str, Any]) -> bool:
    """Drawn in green in the plots: entries whose losses train no classifier (no label or logit in the backbone),
    so a linear probe evaluates them; by the losses a run was configured with, not by the method's name."""
    return row["evaluated_with"] == "linear probe"


def budget_figure(tables: list[dict[str, Any]]) -> Figure:
    """Top-1 (mean ± std over seeds) of each method entry at each label fraction of the sweep, feature-only entries
    in greens, the others in grays, each with its own marker: one line per entry against the fraction on a log axis,
    or with a single fraction one point per entry, side by side."""
    rows = tables[0]["methods"]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    if len(tables) == 1:
        _entries_at_one_fraction(ax, tables[0], _shades(rows))
    else:
        _entries_against_fractions(ax, tables, _shades(rows))
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    return figure


def _entries_against_fractions(ax, tables: list[dict[str, Any]], shade: dict[str, Any]) -> None:
    """One line per entry over the fractions (log axis), entries set a little to the side of each other so that
    their error bars do not hide one another."""
    fractions, cells = [t["label_fraction"] for t in tables], _cells(tables)
    methods = list(shade)
    for k, method in enumerate(methods):
        cell = [cells[f, method] for f in fractions]
        dodge = 10 ** (DODGE_DECADES * (k - (len(methods) - 1) / 2))
        ax.errorbar(
            [f * dodge for f in fractions],
            [c["mean"] for c in cell],
            yerr=[c["std"] for c in cell],
            label=method,
            color=shade[method],
            marker=MARKERS[k % len(MARKERS)],
            capsize=3,
            linewidth=1.5,
        )
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(fractions, [f"{t['label_fraction']:g}\n({t['num_labelled']})" for t in tables])
    ax.set_xlabel("label fraction (labelled train images)")
    ax.set_title("top-1 against the label budget, mean ± std over seeds\nfeature-only (green) vs logit-based (gray)")
    ax.legend(fontsize="small")


def _entries_at_one_fraction(ax, table: dict[str, Any], shade: dict[str, Any]) -> None:
    """One point per entry at x = 0, 1, ..., named on the axis: a single fraction has no axis of fractions."""
    for k, row in enumerate(table["methods"]):
        color, marker = shade[row["method"]], MARKERS[k % len(MARKERS)]
        ax.errorbar([k], [row["mean"]], yerr=[row["std"]], color=color, marker=marker, capsize=3)
    crowded = {"rotation": 20, "ha": "right"} if len(shade) > 3 else {}  # long entry names side by side
    ax.set_xticks(range(len(shade)), list(shade), **crowded)
    ax.set_xlim(-0.5, len(shade) - 0.5)
    ax.set_xlabel(f"method entry ({table['num_labelled']} labelled train images)")
    ax.set_title(
        f"top-1 at label fraction {table['label_fraction']:g}, mean ± std over seeds\n"
        "feature-only (green) vs logit-based (gray)"
    )


def _shades(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each entry's color, in the rows' order: feature-only entries in greens, the others in grays."""
    greens = [r["method"] for r in rows if feature_only(r)]
    grays = [r["method"] for r in rows if not feature_only(r)]
    shade = {m: colormaps["Greens"](0.5 + 0.4 * k / max(1, len(greens) - 1)) for k, m in enumerate(greens)}
    shade |= {m: colormaps["Greys"](0.4 + 0.45 * k / max(1, len(grays) - 1)) for k, m in enumerate(grays)}
    return {r["method"]: shade[r["method"]] for r in rows}
