"""P4: seconds per tap and peak RSS of `kdpipe score` at N = 10k and 50k cached samples of a (256, 8, 8) tap.

Each N is scored in its own subprocess so its peak RSS is its own. Subsets A and B do not grow with N (10 classes:
500 per class each), so peak RSS should not either; the last line prints RSS(50k) / RSS(10k).

    python benchmarks/p4_score.py [--sizes 10000,50000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
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


def measure(path: str) -> None:
    """Child process: score the store, print seconds and this process's peak RSS as JSON."""
    from pipeline import ScoreConfig, score

    start = time.perf_counter()
    summary = score(ScoreConfig(store=path, plot=False))
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds_per_tap": seconds / len(summary["taps"]),
                "peak_rss_mib": peak_mib,
                "subset_sizes": summary["subset_sizes"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--workdir", default=None, help="Where the synthetic stores go (default: a temp dir).")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = {}
        for n in sizes:
            path = Path(tmp) / f"n{n}.zarr"
            build_store(path, n)
            out = subprocess.run(
                [sys.executable, __file__, "--measure", str(path)], check=True, capture_output=True, text=True
            ).stdout
            results[n] = json.loads(out.strip().splitlines()[-1])
            r = results[n]
            print(
                f"N={n:>6d}  tap {TAP_SHAPE}  {r['seconds_per_tap']:.2f} s/tap  peak RSS {r['peak_rss_mib']:.0f} MiB  "
                f"subsets A={r['subset_sizes']['A']} B={r['subset_sizes']['B']}"
            )
    small, large = results[sizes[0]], results[sizes[-1]]
    print(f"peak RSS ratio N={sizes[-1]} / N={sizes[0]}: {large['peak_rss_mib'] / small['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
