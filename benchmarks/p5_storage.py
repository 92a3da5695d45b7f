"""P5: stored bytes / float32 bytes of the default store, and the codec comparison the default was picked from.

Real activations: a resnet20 teacher trained briefly on the embedded digits data, every tap of the train split.
Each codec re-encodes the same float16 chunks (as zarr stores them); its ratio is against float32 bytes, its speed
is MB of float16 per second of one core. Target for the default store: <= 0.6.

    python benchmarks/p5_storage.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc

from pipeline.layout import EXTRACT_SUMMARY, STORE_NAME, TEACHER_WEIGHTS
from workload import kdpipe, setup_threads

CODECS = [
    "zstd:1:shuffle",
    "zstd:1:bitshuffle",
    "zstd:3:shuffle",
    "zstd:5:shuffle",
    "lz4:5:shuffle",
    "lz4:5:bitshuffle",
    "lz4:9:bitshuffle",
    "blosclz:5:shuffle",
    "none",
]
SHUFFLE = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE, "noshuffle": Blosc.NOSHUFFLE}


def measure(chunks: list[np.ndarray], codec: str) -> tuple[float, float, float]:
    """(stored / float32 bytes, encode MB/s, decode MB/s) over the chunks, one thread."""
    raw16 = sum(c.nbytes for c in chunks)
    if codec == "none":
        return 0.5, float("inf"), float("inf")
    cname, clevel, shuffle = codec.split(":")
    blosc = Blosc(cname=cname, clevel=int(clevel), shuffle=SHUFFLE[shuffle])
    start = time.perf_counter()
    encoded = [blosc.encode(c) for c in chunks]
    encode = time.perf_counter() - start
    start = time.perf_counter()
    for e in encoded:
        blosc.decode(e)
    decode = time.perf_counter() - start
    return sum(len(e) for e in encoded) / (2 * raw16), raw16 / encode / 1e6, raw16 / decode / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    setup_threads()
    from numcodecs import blosc

    blosc.set_nthreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kdpipe(
            "teach",
            "--dataset",
            "digits",
            "--teacher",
            "resnet20",
            "--epochs",
            str(args.epochs),
            "--device",
            "cpu",
            "--out",
            str(tmp / "teacher"),
        )
        kdpipe(
            "extract",
            "--dataset",
            "digits",
            "--teacher",
            "resnet20",
            "--device",
            "cpu",
            "--checkpoint",
            str(tmp / "teacher" / TEACHER_WEIGHTS),
            "--out",
            str(tmp / "store"),
        )
        summary = json.loads((tmp / "store" / EXTRACT_SUMMARY).read_text())["splits"]["train"]
        group = zarr.open_group(str(tmp / "store" / STORE_NAME), mode="r")["train/features"]
        chunks = []
        for _, array in group.arrays():
            values, rows = array[:], array.chunks[0]
            chunks += [np.ascontiguousarray(values[s : s + rows]) for s in range(0, len(values), rows)]
    features = {k: v for k, v in summary["arrays"].items() if k.startswith("features/")}
    default_ratio = sum(a["stored_bytes"] for a in features.values()) / (
        2 * sum(a["raw_bytes"] for a in features.values())
    )
    print(
        f"real activations: resnet20 on digits, {len(chunks)} float16 chunks, "
        f"{sum(c.nbytes for c in chunks) / 2**20:.0f} MiB"
    )
    print(f"{'codec':20s} {'stored/fp32':>12s} {'encode MB/s':>12s} {'decode MB/s':>12s}")
    for codec in CODECS:
        ratio, encode, decode = measure(chunks, codec)
        print(f"{codec:20s} {ratio:12.3f} {encode:12.0f} {decode:12.0f}")
    print(
        f"P5 default store ({summary['compression'] if 'compression' in summary else 'default codec'}) "
        f"stored / float32 bytes: {default_ratio:.3f} (target <= 0.6)"
    )


if __name__ == "__main__":
    main()
