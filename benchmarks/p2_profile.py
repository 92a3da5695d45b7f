"""P2's profile: the CPU `kdpipe extract` spends per image, part by part, and the P2 ceiling that leaves on 2 cores.

The bare forward already keeps both cores busy, so every CPU millisecond extraction adds to it comes off throughput:
at best (the cores never idle, nothing waits) P2 = forward / (forward + the rest). Each part runs alone on P2's
workload and is timed in CPU seconds per thread (/proc, Linux), which other processes on the machine barely move,
unlike wall time:

- forward: the teacher over the images recording every tap (both torch threads, the loader included);
- float16 conversion into extract's reusable buffers (`HalfSlots`), on the main thread;
- the background writer alone on those float16 batches, into a store opened again as extract does, by thread: the
  writer's own (row copies into the chunk buffers, the finiteness check, also timed alone), zarr's event loop
  (chunk assembly, crc32c, hand-offs to its pool), zarr's pool in user mode (Blosc) and in system mode (the file
  writes: the kernel's page-cache work for new files).

    python benchmarks/p2_profile.py [--num-images 3000] [--batch-size 64]
"""

from __future__ import annotations

import os

# As `kdpipe extract` runs (pipeline/__init__.py): OpenMP's spinning waits would count as the forward's CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cache.schema import FEATURES  # noqa: E402
from cache.store import ArraySpec, FeatureStore, first_non_finite_row  # noqa: E402
from cache.writer import SplitWriter  # noqa: E402
from p2_extract_overhead import teacher_forward  # noqa: E402
from pipeline.stages.extract import FEATURE_DTYPE, QUEUE_BATCHES, HalfSlots  # noqa: E402
from workload import DATASET, TEACHER, THREADS, teacher_checkpoint  # noqa: E402

KEPT_BATCHES = 4  # distinct batches of real activations the writer cycles through (compression depends on them)


def thread_cpu() -> dict[int, tuple[str, float, float]]:
    """Per live thread of this process: (name, user seconds, system seconds); threads torch's OpenMP started have
    no Python name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        name = re.sub(r"_\d+$", "", names.get(tid, "OpenMP"))  # zarr's pool threads: asyncio_0, asyncio_1, ...
        times[tid] = (name, int(fields[11]) / tick, int(fields[12]) / tick)
    return times


def cpu_since(before: dict[int, tuple[str, float, float]]) -> dict[str, tuple[float, float]]:
    """(user, system) seconds per thread name since `before`, over the threads alive at both ends."""
    spent = collections.defaultdict(lambda: (0.0, 0.0))
    for tid, (name, user, system) in thread_cpu().items():
        _, user0, system0 = before.get(tid, (name, 0.0, 0.0))
        total = spent[name]
        spent[name] = (total[0] + user - user0, total[1] + system - system0)
    return spent


class TimedWriter(SplitWriter):
    """The writer, recording its own thread's CPU seconds (the thread ends before it could be read from /proc)."""

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            self.cpu_seconds = time.thread_time()


def forward_and_conversion(
    checkpoint: str, num_images: int, batch_size: int, teacher: str = TEACHER, dataset: str = DATASET
):
    """CPU seconds of the forward and of the float16 conversion over the images, and a few converted batches."""
    recorder, loader, _ = teacher_forward(checkpoint, num_images, batch_size, teacher=teacher, dataset=dataset)
    forward = conversion = 0.0
    slots, kept = None, []
    with torch.no_grad(), recorder:
        batches = iter(loader)
        while True:
            start = time.process_time()  # nothing else of this process runs now: its CPU is the forward's
            images = next(batches, None)
            if images is None:
                break
            features = {f"{FEATURES}/{name}": values for name, values in recorder.run(images[0]).items()}
            middle = time.process_time()
            if slots is None:  # the buffers kept, and one reused as extract reuses its own
                slots = HalfSlots({k: v.shape[1:] for k, v in features.items()}, batch_size, KEPT_BATCHES + 1)
            converted, release = slots.fill(features)
            conversion += time.process_time() - middle
            forward += middle - start
            if len(kept) < KEPT_BATCHES:
                kept.append((converted, recorder.logits.float().numpy()))
            else:
                release()
    return forward, conversion, kept


def write_alone(kept, num_images: int, folder: Path) -> tuple[float, dict[str, tuple[float, float]], float]:
    """The writer's own CPU seconds, zarr's threads' (user, system) seconds, and the finiteness check's seconds, for
    `num_images` rows cycling through the `kept` batches."""
    features, logits = kept[0]
    specs = [ArraySpec(path, values.shape[1:], FEATURE_DTYPE) for path, values in features.items()]
    specs += [ArraySpec(p, (), "int64", sets_block=False) for p in ("labels", "indices")]
    specs.append(ArraySpec("logits", logits.shape[1:], "float32", sets_block=False))
    store = FeatureStore.create(folder / "store.zarr", {"identity": {}})
    store.create_split("train", num_images, specs, [p.split("/", 1)[1] for p in features], {"split": "train"})
    part = FeatureStore.open(store.path, mode="r+").split("train")  # extract writes into the store opened again
    before = thread_cpu()
    check = 0.0
    with TimedWriter(part, part.missing_blocks(), queue_size=QUEUE_BATCHES) as writer:
        for number, start in enumerate(range(0, num_images, len(logits))):
            features, logits = kept[number % len(kept)]
            rows = min(len(logits), num_images - start)
            batch = {path: values[:rows] for path, values in features.items()}
            began = time.thread_time()
            for values in batch.values():
                first_non_finite_row(values)
            check += time.thread_time() - began
            batch.update(labels=np.zeros(rows, np.int64), indices=np.arange(start, start + rows), logits=logits[:rows])
            writer.put(batch)
    zarr_threads = {name: cpu for name, cpu in cpu_since(before).items() if name in ("zarr_io", "asyncio")}
    return writer.cpu_seconds, zarr_threads, check


def profile(
    checkpoint: str, num_images: int, batch_size: int, folder: Path, teacher: str = TEACHER, dataset: str = DATASET
) -> tuple[list[tuple[str, float]], float, float]:
    """Every part's CPU seconds over `num_images` (label, seconds), the forward's and extraction's on top of it; the
    writer's store goes in `folder`."""
    forward, conversion, kept = forward_and_conversion(checkpoint, num_images, batch_size, teacher, dataset)
    writer, zarr_threads, check = write_alone(kept, num_images, folder)
    loop, pool = zarr_threads.get("zarr_io", (0.0, 0.0)), zarr_threads.get("asyncio", (0.0, 0.0))
    parts = [
        ("teacher forward (bare, both threads)", forward),
        ("float16 conversion (main thread)", conversion),
        ("writer thread: row copies + finiteness check", writer),
        ("  of which the finiteness check, alone", check),
        ("zarr event loop: chunk assembly, crc32c, hand-offs", sum(loop)),
        ("zarr pool, user: Blosc compression", pool[0]),
        ("zarr pool, system: file writes", pool[1]),
    ]
    return parts, forward, conversion + writer + sum(loop) + sum(pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n = args.num_images
    with tempfile.TemporaryDirectory() as tmp:
        parts, forward, added = profile(teacher_checkpoint(Path(tmp)), n, args.batch_size, Path(tmp))
    print(f"CPU ms per image, {n} images, batch {args.batch_size}, {THREADS} torch threads:")
    for label, seconds in parts:
        print(f"  {label:52s} {1000 * seconds / n:6.2f}")
    print(f"  {'extraction on top of the forward':52s} {1000 * added / n:6.2f}")
    ceiling = forward / (forward + added)
    print(f"P2 ceiling on {THREADS} busy cores, forward / (forward + extraction CPU): {ceiling:.2f}")


if __name__ == "__main__":
    main()
