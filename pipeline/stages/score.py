"""`kdpipe score`: knowledge quality Q of every cached tap, out of core, and the top-k teacher layers.

Subsets A and B (docs/method.md §1 step 2) are drawn from the cached labels; their rows are gathered chunk by chunk
(never per sample), pooled and flattened as they are read. Memory holds subset A and at most
`--memory-gb` of subset B at a time, whatever the number of cached samples.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cache.location import location
from cache.lock import lock_output, store_lock
from cache.reader import gather_rows
from cache.records import Picks
from cache.schema import LABELS
from cache.store import FeatureStore, SplitStore

from ..config import ScoreConfig
from ..data.datasets import stratified_subset
from ..distillation.quality import (
    QualityError,
    class_spectrum,
    draw_subsets,
    flatten_features,
    information,
    knowledge_quality,
    pool_kernel,
    select_top_k,
    subset_a_stats,
)
from ..engine.cluster import dask_client, run_tasks, same_threads, scheduler_kind, thread_counts
from ..engine.runtime import resolve_device, write_config, write_json, write_png
from ..errors import UserError, writing
from ..layout import score_files
from ..models.taps import Tap
from ..version import __version__


def score(config: ScoreConfig) -> dict[str, Any]:
    """Scores the taps of the store's split, records them in the store and beside it (`layout.score_files`), under
    the store's lock; returns the summary."""
    path = FeatureStore.locate(config.store)
    with lock_output(path, store_lock(path), config.command):
        return _score(config, FeatureStore.open_complete(path, mode="r+"))


def _score(config: ScoreConfig, feature_store: FeatureStore) -> dict[str, Any]:
    part = _checked_split(feature_store, config.split)
    taps = _taps_to_score(feature_store, part, config.layers)
    num_classes = feature_store.identity.dataset.num_classes
    labels = part.read(LABELS)
    rows = _sample_rows(labels, num_classes, config.max_samples, config.seed)
    try:
        subset_a, subset_b = draw_subsets(labels[rows], num_classes, config.seed)
    except QualityError as err:
        raise UserError(f"{feature_store.path} [{config.split}]: {err}") from err
    a_rows, b_rows = rows[subset_a], rows[subset_b]
    n_train = _train_split_size(feature_store, part)
    device = resolve_device(config.device)  # refused here, before any work, when CUDA is asked for and absent
    budget_bytes = max(1, int(config.memory_gb * 2**30))
    scores_file, plot_file, args_file = score_files(feature_store.path)
    write_config(args_file, config)
    threads = thread_counts()  # dask workers compute with this process's thread counts: the same numbers
    job = partial(
        score_tap,
        store=feature_store.path.absolute(),  # a dask worker opens the store itself, maybe from another folder
        split=config.split,
        a_rows=a_rows,
        a_labels=labels[a_rows],
        b_rows=b_rows,
        b_labels=labels[b_rows],
        num_classes=num_classes,
        n_train=n_train,
        budget_bytes=budget_bytes,
        workers=config.workers,
        device=str(device),
        threads=threads,
    )
    with dask_client(config.scheduler, config.dask_workers, config.dask_processes) as client:
        scheduler = {**scheduler_kind(client, config.dask_processes), "threads": threads}
        results = run_tasks(client, job, taps, desc="score", unit="tap")
    selected, notes = _select(results, config.top_k)
    identity = feature_store.identity
    summary = {
        "stage": "score",
        "kdpipe_version": __version__,
        "store": str(feature_store.path),
        "config_hash": feature_store.provenance.config_hash,  # the store scored (kdpipe summary compares it)
        "scores_file": str(scores_file),
        "plot_file": str(plot_file) if config.plot else None,
        "split": config.split,
        "teacher": identity.teacher.name,
        "dataset": identity.dataset.name,
        "seed": config.seed,
        "top_k": config.top_k,
        "selected": [results[i]["name"] for i in selected],
        "num_samples": len(rows),
        "n_train": n_train,
        "num_classes": num_classes,
        "subset_sizes": {"A": len(a_rows), "B": len(b_rows)},
        "scheduler": scheduler,
        "device": str(device),
        "notes": notes,
        "taps": results,
    }
    _record(part, summary)
    return summary


def _checked_split(store: FeatureStore, split: str) -> SplitStore:
    part = store.split(split)
    if LABELS not in part.array_names:
        raise UserError(f"{store.path} [{split}] has no labels; Q needs them")
    return part


def _train_split_size(store: FeatureStore, part: SplitStore) -> int:
    """N_train of K: the size of the dataset's whole training split (docs/method.md quirk 8), whatever split is
    scored."""
    train = store.identity.dataset.splits.get("train")
    return int(train["size"]) if train else int(part.record.dataset_size)


def _taps_to_score(store: FeatureStore, part: SplitStore, layers: tuple[str, ...]) -> list[dict[str, Any]]:
    """The requested taps (default: all) as recorded in the store, in depth order."""
    taps = store.identity.taps
    names = [t["name"] for t in taps]
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise UserError(f"tap {unknown[0]!r} is not in {store.path}; it holds {', '.join(names)}")
    return [t for t in taps if not layers or t["name"] in layers]


def _sample_rows(labels: np.ndarray, num_classes: int, max_samples: int | None, seed: int) -> np.ndarray:
    """All cached rows, or a seeded class-stratified subset of `max_samples` of them (a smaller cache)."""
    if len(np.unique(labels)) < 2 or num_classes < 2:
        raise UserError("Q needs at least 2 classes in the cached labels")
    if max_samples is None or max_samples >= len(labels):
        return np.arange(len(labels))
    if max_samples < 2 * num_classes:
        raise UserError(f"--max-samples={max_samples}: Q needs at least 2 samples of each of {num_classes} classes")
    try:
        return stratified_subset(labels, max_samples, seed)
    except UserError as err:  # a class too small to stratify
        raise UserError(f"--max-samples={max_samples}: {err}") from None


def score_tap(tap: dict[str, Any], store: Path, split: str, threads: dict[str, int], **inputs: Any) -> dict[str, Any]:
    """One tap's entry of the summary: `tap_quality` with `inputs` (subsets, sizes, budget), on the thread counts
    `threads`. It opens the store itself (read-only), so it runs the same in this process and as a dask task on a
    worker that reaches the store by the same path."""
    start = time.perf_counter()
    part = FeatureStore.open(store, mode="r").split(split)
    with same_threads(threads):
        result = tap_quality(part, Tap.from_record(tap), **inputs)
    return {
        "index": tap["index"],
        "name": tap["name"],
        "shape": tap["shape"],
        **result,
        "seconds": round(time.perf_counter() - start, 3),
    }


def tap_quality(
    part: SplitStore,
    tap: Tap,
    a_rows: np.ndarray,
    a_labels: np.ndarray,
    b_rows: np.ndarray,
    b_labels: np.ndarray,
    num_classes: int,
    n_train: int,
    budget_bytes: int,
    workers: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """S, I, E, Q and their parts for one tap, the Gram product on `device`.

    Subset A is read with the first class group of subset B in one pass; further groups (only when B exceeds
    `budget_bytes` beyond A) take one pass each.
    """
    array = part.feature(tap.name)
    kernel = pool_kernel(tap.shape)
    flatten = partial(flatten_features, kernel=kernel, channels_last=tap.layout == "NHWC")
    dim = flatten(np.zeros((1, *tap.shape), dtype=np.float32)).shape[1]
    spectra, sizes = [], []
    budget_rows = max(0, budget_bytes // (4 * dim) - len(a_rows))
    for group, classes in enumerate(_class_groups(np.bincount(b_labels, minlength=num_classes), budget_rows)):
        in_group = np.isin(b_labels, classes)
        rows = b_rows[in_group] if group else np.concatenate([a_rows, b_rows[in_group]])  # one pass reads A too
        block, block_labels = gather_rows(array, rows, flatten, workers), b_labels[in_group]
        if not np.isfinite(block).all():  # missing chunks read as NaN; the writer never stores non-finite values
            raise UserError(f"tap {tap.name} reads non-finite values: a chunk of {array.path} is missing or damaged")
        if group == 0:
            a_stats = subset_a_stats(block[: len(a_rows)], a_labels, num_classes, n_train, resolve_device(device))
            block = block[len(a_rows) :]
        for c in classes:
            spectra.append(class_spectrum(block[block_labels == c]))
            sizes.append(int((block_labels == c).sum()))
    info = information(spectra, sizes, a_stats.mu)
    q = knowledge_quality(a_stats, info)
    return {
        "D": dim,
        "pool_kernel": kernel,
        "S": a_stats.S,
        "I": info.I,
        "E": a_stats.E,
        "Q": q,
        "mu": a_stats.mu,
        "Delta": a_stats.Delta,
        "R": a_stats.R,
        "K": a_stats.K,
        "d": a_stats.d,
        "mean_entropy": info.mean_entropy,
        "per_class": {
            "intra_cos": a_stats.intra,
            "min_cos": a_stats.min_cos,
            "nearest_other": a_stats.nearest_other,
            "mean_norm": a_stats.mean_norm,
            "embedding_dim": info.embedding_dims,
            "entropy": info.entropies,
        },
    }


def _class_groups(class_sizes: np.ndarray, budget_rows: int) -> list[list[int]]:
    """Consecutive classes packed so each group's rows fit the budget (a class is never split)."""
    groups: list[list[int]] = [[]]
    rows = 0
    for c, size in enumerate(class_sizes):
        if groups[-1] and rows + size > budget_rows:
            groups.append([])
            rows = 0
        groups[-1].append(c)
        rows += int(size)
    return groups


def _select(results: list[dict[str, Any]], top_k: int) -> tuple[list[int], list[str]]:
    qualities = [r["Q"] for r in results]
    notes = []
    if top_k > len(results):
        notes.append(f"--top-k={top_k} exceeds the {len(results)} scored taps: all are selected")
    for r in results:
        if math.isnan(r["Q"]):
            notes.append(f"tap {r['name']} has Q = NaN (a zero-norm sample or zero spread); it is ranked last")
    selected = select_top_k(qualities, top_k)
    cut = sorted((q for q in qualities if not math.isnan(q)), reverse=True)
    if len(cut) > top_k and cut[top_k - 1] == cut[top_k]:
        notes.append(f"Q ties at the top-{top_k} cut ({cut[top_k]:.6g}); the shallower tap is preferred")
    return selected, notes


def _record(part: SplitStore, summary: dict[str, Any]) -> None:
    """Scores into the split's attributes and the summary's scores file (and plot) next to the store."""
    with writing(part.path):
        quality = {t["name"]: t["Q"] for t in summary["taps"]}
        part.record_scores(Picks(summary["selected"], quality, summary["seed"], summary["top_k"]))
    write_json(location(summary["scores_file"]), summary)
    if summary["plot_file"]:
        plot_scores(summary, location(summary["plot_file"]))


def plot_scores(summary: dict[str, Any], path: Path) -> None:
    """S, I, E and Q against tap depth, the top-k picks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taps = summary["taps"]
    depth = [t["index"] for t in taps]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(taps)), 4.0))
    for key, style in (("S", "--"), ("I", "-."), ("E", ":"), ("Q", "-")):
        ax.plot(depth, [t[key] for t in taps], style, marker="o", markersize=3, label=key, lw=2 if key == "Q" else 1)
    picks = [t for t in taps if t["name"] in summary["selected"]]
    ax.scatter(
        [t["index"] for t in picks],
        [t["Q"] for t in picks],
        s=120,
        facecolors="none",
        edgecolors="red",
        zorder=3,
        label=f"top-{summary['top_k']} by Q",
    )
    ax.set_xticks(depth, [t["name"] for t in taps], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("teacher tap (depth order)")
    ax.set_title(f"Knowledge quality per layer: {summary['teacher']} on {summary['dataset']} ({summary['split']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)


def format_table(summary: dict[str, Any]) -> str:
    """One row per tap in depth order; `*` marks the selected taps."""
    lines = [f"{'':1s} {'idx':>3s}  {'tap':20s} {'D':>7s} {'S':>8s} {'I':>8s} {'E':>8s} {'Q':>8s}"]
    for t in summary["taps"]:
        mark = "*" if t["name"] in summary["selected"] else " "
        lines.append(
            f"{mark} {t['index']:>3d}  {t['name']:20s} {t['D']:>7d} {t['S']:>8.4f} {t['I']:>8.4f} "
            f"{t['E']:>8.4f} {t['Q']:>8.4f}"
        )
    lines.append(f"selected (depth order): {', '.join(summary['selected'])}")
    lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines)
