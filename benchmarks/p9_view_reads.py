"""P9: how distill reads a store of K augmented views when its targets are streamed: the layout and the view draw
kdpipe uses against the two alternatives, measured on the same rows in one run.

    built     a group per view (`views/<v>/`, chunks of one view), a view drawn per block per epoch: each window reads
              its blocks once, from the view drawn for each (`cache.reader.CachedTargets`, as distill runs it)
    per row   the same groups, a view drawn per row: a window must read each of its blocks from every view
    axis      one array (N, K, *shape) whose chunks hold all K views of their rows, a view drawn per row: one read
              per block, of K views' bytes

Target: the built path reads 1/K of the bytes of either alternative and is the fastest. (A chunk of all K views
also cannot be written view by view, so an interrupted extract could not resume inside a view.)

    python benchmarks/p9_view_reads.py [--num-images 4096] [--views 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import zarr

from workload import Timer, setup_threads

TAP, SHAPE = "layer3.1", (256, 8, 8)  # resnet18_cifar's stage-3 map, 32 KiB a row in float16
BATCH = 128
STREAM_BUDGET = 64 << 20


def build(path: Path, num_images: int, views: int):
    """A split with `views` views of one tap (random values: reading speed ignores them), and the same values in a
    view-axis array beside it."""
    from cache.store import ArraySpec, FeatureStore, compressors

    store = FeatureStore.create(path / "store.zarr", {"identity": {}, "config_hash": "bench"})
    spec = [ArraySpec(f"features/{TAP}", SHAPE, "float16")]
    part = store.create_split(
        "train", num_images, spec, [TAP], {"dataset_size": num_images}, view_specs=spec, views=views
    )
    axis = zarr.create_array(
        str(path / "axis.zarr"),
        shape=(num_images, views, *SHAPE),
        chunks=(part.block_rows, views, *SHAPE),
        dtype="float16",
        compressors=compressors(),
    )
    rng = np.random.default_rng(0)
    for start in range(0, num_images, part.block_rows):
        stop = min(start + part.block_rows, num_images)
        values = rng.standard_normal((views, stop - start, *SHAPE), dtype=np.float32).astype(np.float16)
        for v, view in enumerate(part.views()):
            view.feature(TAP)[start:stop] = values[v]
        axis[start:stop] = values.swapaxes(0, 1)
    return part, axis


def built_epoch(part, views: int) -> tuple[float, int]:
    """Seconds and bytes read for one streamed epoch as distill reads it."""
    from cache.reader import CachedTargets

    targets = CachedTargets(part, [f"features/{TAP}"], STREAM_BUDGET, views=views)
    assert not targets.in_memory
    rng = np.random.default_rng(0)
    windows = targets.epoch_order(rng)
    draws = targets.view_draws(windows, rng)
    with Timer() as timer:
        for _ in targets.batches(windows, BATCH, draws):
            pass
    return timer.seconds, part.num_samples * int(np.prod(SHAPE)) * 2


def per_row_epoch(part, views: int) -> tuple[float, int]:
    """The same windows with a view per row: every block of a window read from every view, then gathered."""
    from cache.reader import CachedTargets

    targets = CachedTargets(part, [f"features/{TAP}"], STREAM_BUDGET, views=views)
    rng = np.random.default_rng(0)
    windows = targets.epoch_order(rng)
    parts = part.views()
    read = 0
    with Timer() as timer:
        for rows in windows:
            row_views = rng.integers(views, size=len(rows))
            blocks = np.unique(rows // part.block_rows)
            ranges = [part.block_range(int(b)) for b in blocks]
            stacked = np.stack(
                [np.concatenate([p.read(f"features/{TAP}", slice(a, b)) for a, b in ranges]) for p in parts]
            )
            read += stacked.nbytes
            position = np.searchsorted(blocks, rows // part.block_rows) * part.block_rows + rows % part.block_rows
            stacked[row_views, position]
    return timer.seconds, read


def axis_epoch(part, axis: zarr.Array, views: int) -> tuple[float, int]:
    """The same windows from the view-axis array: one read per block, all views in it."""
    from cache.reader import CachedTargets

    targets = CachedTargets(part, [f"features/{TAP}"], STREAM_BUDGET, views=views)
    rng = np.random.default_rng(0)
    windows = targets.epoch_order(rng)
    read = 0
    with Timer() as timer:
        for rows in windows:
            row_views = rng.integers(views, size=len(rows))
            blocks = np.unique(rows // part.block_rows)
            values = np.concatenate([axis[slice(*part.block_range(int(b)))] for b in blocks])
            read += values.nbytes
            position = np.searchsorted(blocks, rows // part.block_rows) * part.block_rows + rows % part.block_rows
            values[position, row_views]
    return timer.seconds, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=4096)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as tmp:
        part, axis = build(Path(tmp), args.num_images, args.views)
        built = built_epoch(part, args.views)
        per_row = per_row_epoch(part, args.views)
        along_axis = axis_epoch(part, axis, args.views)
    print(
        f"{args.num_images} images, {args.views} views of {TAP} {SHAPE}, blocks of {part.block_rows} rows, "
        f"streamed under {STREAM_BUDGET >> 20} MiB"
    )
    print("| layout, draw | s per epoch | MiB read | vs built |")
    print("|---|---|---|---|")
    for name, (seconds, read) in (
        ("built: group per view, view per block", built),
        ("group per view, view per row", per_row),
        ("view axis in the chunk, view per row", along_axis),
    ):
        print(f"| {name} | {seconds:.2f} | {read / 2**20:.0f} | {seconds / built[0]:.1f}x |")
    print(f"P9 fastest alternative / built: {min(per_row[0], along_axis[0]) / built[0]:.1f}x (target > 1)")


if __name__ == "__main__":
    main()
