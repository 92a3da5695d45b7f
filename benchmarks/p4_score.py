"""P4: `kdpipe score` on one (256, 8, 8) tap against a plain numpy implementation of docs/method.md §1, and its memory.

Speed: both score the same 5,000-sample store (10 classes, so subsets A and B are every sample) with one thread
(torch, BLAS, reader), each in its own subprocess, both timed from reading the store to Q; they must agree to 1e-6.
The numpy side (`numpy_quality`, below) is what a careful user would write: float64 Gram product (numpy's syrk),
vectorised class statistics, numpy's SVD for the class spectra.

Memory: kdpipe's peak RSS at N = 10k and 50k cached samples, each N in its own subprocess. Subsets A and B do not
grow with N (10 classes: 500 per class each), so peak RSS should not either.

The last line prints the speed-up and RSS(50k) / RSS(10k).

    python benchmarks/p4_score.py [--speed-samples 5000] [--sizes 10000,50000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TAP_SHAPE = (256, 8, 8)
NUM_CLASSES = 10
WRITE_ROWS = 2048


def build_store(path: Path, num_samples: int, seed: int = 0) -> None:
    """A complete single-tap store with class structure, written chunk by chunk so memory stays small."""
    from cache.store import ArraySpec, FeatureStore

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, num_samples)
    centres = rng.standard_normal((NUM_CLASSES, *TAP_SHAPE)).astype(np.float32)
    identity = {
        "teacher": {"name": "synthetic", "checkpoint_sha256": None},
        "dataset": {"name": "synthetic", "num_classes": NUM_CLASSES},
        "taps": [{"index": 0, "name": "layer", "shape": list(TAP_SHAPE), "kind": "map"}],
    }
    store = FeatureStore.create(
        path,
        {
            "identity": identity,
            "config_hash": "bench",
            "kdpipe_version": "bench",
            "created": "bench",
            "checkpoint_path": None,
        },
    )
    part = store.create_split(
        "train",
        num_samples,
        [ArraySpec("features/layer", TAP_SHAPE, "float16"), ArraySpec("labels", (), "int64", sets_block=False)],
        ["layer"],
        {"split": "train", "dataset_size": num_samples, "fingerprint": "bench"},
    )
    features = part.feature("layer")
    step = part.block_rows * max(1, WRITE_ROWS // part.block_rows)
    for start in range(0, num_samples, step):
        stop = min(start + step, num_samples)
        noise = rng.standard_normal((stop - start, *TAP_SHAPE), dtype=np.float32)
        features[start:stop] = (centres[labels[start:stop]] + 2.0 * noise).astype(np.float16)
    part.array("labels")[:] = labels
    for block in range(part.num_blocks):
        part.mark_block_done(block)
    part.mark_complete()
    store.mark_complete()


def numpy_quality(path: Path, seed: int = 0) -> dict[str, float]:
    """docs/method.md §1 in plain vectorised numpy on the store's one tap (no pooling: D = 16,384 <= 262,144)."""
    import zarr

    split = zarr.open_group(str(path), mode="r")["train"]
    labels = split["labels"][:]
    x = split["features/layer"][:].reshape(len(labels), -1).astype(np.float32)
    n_train, classes = len(labels), NUM_CLASSES
    per_a, per_b = 5000 // classes, min(500, n_train // classes)

    def subset(rng: np.random.Generator, per_class: int) -> np.ndarray:
        members = [np.flatnonzero(labels == c) for c in range(classes)]
        return np.concatenate([m[rng.permutation(len(m))[:per_class]] for m in members])

    a, b = subset(np.random.default_rng(seed), per_a), subset(np.random.default_rng(seed + 1), per_b)
    xa, ya = x[a].astype(np.float64), labels[a]
    gram = xa @ xa.T
    r = np.sqrt(np.diag(gram))
    cos = np.abs(gram) / np.outer(r, r)
    dist = np.sqrt(np.maximum(r[:, None] ** 2 + r[None, :] ** 2 - 2 * gram, 0))
    onehot = np.eye(classes)[ya]
    means = (onehot.T @ cos @ onehot) / np.outer(onehot.sum(0), onehot.sum(0))
    s_value = np.diag(means).mean() - means[~np.eye(classes, dtype=bool)].mean()
    mu = np.mean([cos[np.ix_(ya == c, ya == c)].min() for c in range(classes)])
    delta = np.mean([dist[np.ix_(ya == c, ya != c)].min() for c in range(classes)])
    radius = np.mean([r[ya == c].mean() for c in range(classes)])
    e_value = (n_train / math.pi) ** (1 / min(xa.shape)) * 2 * delta / radius
    spectra = []
    for c in range(classes):
        z = x[b][labels[b] == c]
        lam = np.linalg.svd(z - z.mean(0), compute_uv=False) ** 2
        spectra.append(lam / lam.sum())
    width = max(len(p) for p in spectra)
    rows = np.zeros((classes, width), dtype=np.float32)
    for c, p in enumerate(spectra):
        rows[c, : len(p)] = p
    cumulative = np.cumsum(rows, axis=1)
    dims = [min(max(int(np.argmax(row >= np.float32(0.95))) + 1, 1), width - 1) for row in cumulative]
    kept = rows[:, : min(sum(dims), width)]
    entropy = [0.0 if (q == 0).any() else float(-(q / q.sum() * np.log(q / q.sum())).sum()) for q in kept]
    i_value = (1 - mu) * np.mean(entropy) / math.log(5)
    return {"S": s_value, "I": i_value, "E": e_value, "Q": s_value + math.sqrt(i_value * e_value)}


def one_thread() -> None:
    """The speed comparison's setting: one thread for torch, BLAS (threadpoolctl) and kdpipe's reader."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def measure(path: str, side: str) -> None:
    """Child process: score the store (kdpipe or numpy), print seconds, its values and peak RSS as JSON."""
    from pipeline import ScoreConfig, score

    if side != "memory":
        one_thread()
    start = time.perf_counter()
    if side == "numpy":
        values = numpy_quality(Path(path))
    else:
        summary = score(ScoreConfig(store=path, plot=False, device="cpu", workers=1 if side == "kdpipe" else 2))
        tap = summary["taps"][0]
        values = {key: tap[key] for key in ("S", "I", "E", "Q")}
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_mib, **values}))


def run_side(path: Path, side: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if side != "memory" else None
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(path), side], check=True, capture_output=True, text=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def speed(folder: Path, num_samples: int) -> float:
    """kdpipe against numpy on one store, one thread each; returns the speed-up."""
    path = folder / f"speed{num_samples}.zarr"
    build_store(path, num_samples)
    ours, theirs = run_side(path, "kdpipe"), run_side(path, "numpy")
    worst = max(abs(ours[k] - theirs[k]) / abs(theirs[k]) for k in ("S", "I", "E", "Q"))
    print(
        f"N={num_samples}, one thread: kdpipe score {ours['seconds']:.2f} s, numpy {theirs['seconds']:.2f} s "
        f"(largest relative difference of S, I, E, Q: {worst:.1e}; Q = {ours['Q']:.6f})"
    )
    if worst > 1e-6:
        raise SystemExit(f"kdpipe and numpy disagree by {worst:.1e} > 1e-6")
    return theirs["seconds"] / ours["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-samples", type=int, default=5000)
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--workdir", default=None, help="Where the synthetic stores go (default: a temp dir).")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        speed_up = speed(Path(tmp), args.speed_samples)
        results = {}
        for n in sizes:
            path = Path(tmp) / f"n{n}.zarr"
            build_store(path, n)
            results[n] = run_side(path, "memory")
            r = results[n]
            print(f"N={n:>6d}  tap {TAP_SHAPE}  {r['seconds']:.2f} s  peak RSS {r['peak_rss_mib']:.0f} MiB")
            shutil.rmtree(path)  # the 50k store is 1.6 GB
    rss = results[sizes[-1]]["peak_rss_mib"] / results[sizes[0]]["peak_rss_mib"]
    print(f"kdpipe vs numpy, one thread: {speed_up:.2f}x faster; peak RSS N={sizes[-1]} / N={sizes[0]}: {rss:.2f}")


if __name__ == "__main__":
    main()
