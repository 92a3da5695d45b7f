"""P15: the issue's figures at real size, on the 60,000-image Fashion-MNIST store of `configs/fashion-mnist.yaml`.

Run after the study's extract stage (`make fashion`; the store is complete once extract.json exists). Nothing is
written next to the study's store: everything reads a hard-linked copy of it (`cp -al`: no bytes copied; zarr and
kdpipe replace files by renaming new ones into place, so what score writes into or beside the copy never reaches
the study's files, and the copy's lock file is a fresh one). Each command runs in its own process; each gets its wall
seconds, CPU seconds (user + system, from wait4 or the rusage of children) and, where it matters, peak RSS:

- P1: the study's student (resnet8 at base width 8, layers layer1.0, layer2.0, layer3.0, batch 64) distilled on Q's
  three picks, reading the store, against `--online-teacher`, and the ideal of `p1_cache_speedup.ideal_speedup`;
- P2: `kdpipe extract` of every tap of the images (all of them, or a stratified subset) with the trained teacher
  against the bare forward (`p2_extract_overhead.bare_forward_rate`), and `p2_profile.profile`'s CPU accounting of as
  many images;
- score: `kdpipe score --no-plot` of every tap on a subset of the rows and on all of them: peak RSS should be flat;
- memory: distill on the stem tap (the largest) streamed under `--cache-memory-gb 0.05` against held in RAM;
- P5: the store's chunk files against float32 bytes, per tap.

About 13 minutes on 2 shared cores, and 10 GB of disk for P2's own store at a time.

    python benchmarks/p15_real_size.py [--store runs/fashion-mnist/extract] [--extract-images N] [--steps N]
"""

from __future__ import annotations

import os

# Set before torch loads, here and in every child: the study's processes keep both cores busy, and OpenMP's spinning
# waits then make torch's parallel regions crawl (a 50 x 4,096 svdvals, score's class spectrum, took 0.87 s instead
# of 3.8 ms under that load), so wall and CPU seconds would measure the contention, not the work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "runs" / "fashion-mnist"
TEACHER = "resnet20"
DATASET = "fashion-mnist"
STUDENT = "resnet8"
STUDENT_KWARGS = {"base_width": 8}
STUDENT_LAYERS = ("layer1.0", "layer2.0", "layer3.0")
BATCH = 64  # the study's distill batch, and P2's extract batch
STREAM_GB = 0.05  # well below the stem tap's 1.9 GiB at 60,000 rows: streamed by chunk
KDPIPE = str(Path(sys.executable).parent / "kdpipe")


def run_measured(command: Sequence[str], log: Path) -> dict[str, float]:
    """Runs `command` in its own process, its output to `log`; its wall and CPU seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not the maximum over all children
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{log.read_text()[-3000:]}")
    return {
        "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
    }


@contextlib.contextmanager
def children_usage() -> Iterator[dict[str, float]]:
    """Wall seconds of the block and CPU seconds of the child processes it waited for."""
    usage: dict[str, float] = {}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    yield usage
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage["wall_s"] = round(time.perf_counter() - start, 2)
    usage["cpu_s"] = round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2)


def linked_copy(extract: Path, folder: Path) -> Path:
    """The extract folder hard-linked into `folder` (same file system), less what score writes beside the store and
    the store's lock: the copy's are its own."""
    from cache.lock import store_lock
    from pipeline.layout import STORE_NAME, score_files

    copy = folder / "extract"
    try:
        shutil.copytree(extract, copy, copy_function=os.link)
    except shutil.Error as err:
        sys.exit(f"cannot hard-link {extract} into {folder} ({err}); pass a --workdir on the store's file system")
    for path in [*score_files(copy / STORE_NAME), store_lock(copy / STORE_NAME)]:
        path.unlink(missing_ok=True)
    return copy


def storage(extract: Path) -> dict:
    """P5 at real size: each tap's chunk files against its float32 bytes."""
    from cache.schema import FEATURES
    from cache.store import FeatureStore

    store = FeatureStore.open(extract)
    taps = {}
    for array in store.split("train").stored_arrays():
        if array.path.startswith(f"{FEATURES}/"):
            tap = array.path.split("/", 1)[1]
            taps[tap] = {"stored_bytes": array.stored_bytes, "fp32_bytes": 4 * math.prod(array.shape)}
    stored, fp32 = (sum(t[k] for t in taps.values()) for k in ("stored_bytes", "fp32_bytes"))
    return {"taps": taps, "stored_bytes": stored, "fp32_bytes": fp32, "ratio": round(stored / fp32, 3)}


def scoring(extract: Path, subset: int, logs: Path) -> dict:
    """`kdpipe score` of every tap on a `subset` of the rows, then on all of them; the second's picks."""
    from pipeline.layout import SCORES

    runs = {}
    for rows in (subset, None):
        command = [KDPIPE, "score", str(extract), "--no-plot", "--top-k", "3", "--device", "cpu"]
        runs[rows or "all"] = run_measured(command + (["--max-samples", str(rows)] if rows else []), logs / "score.log")
        scores = json.loads((extract / SCORES).read_text())
        runs[rows or "all"].update(num_samples=scores["num_samples"], selected=scores["selected"])
    small, full = runs[subset], runs["all"]
    return {"subset": small, "all": full, "rss_ratio": round(full["peak_rss_mib"] / small["peak_rss_mib"], 2)}


def cache_speedup(extract: Path, checkpoint: str, picks: list[str], steps: int | None, folder: Path) -> dict:
    """P1 on the store: the study's student distilled from it and with the teacher online, and the ideal."""
    from p1_cache_speedup import distill_epoch, ideal_speedup

    flags = ["--model-kwargs", json.dumps(STUDENT_KWARGS), "--student-layers", ",".join(STUDENT_LAYERS)]
    flags += ["--steps", str(steps)] if steps else []
    common = {"teacher_taps": picks, "student_name": STUDENT, "batch_size": BATCH}
    with children_usage() as cached_usage:
        cached = distill_epoch(extract, folder / "p1-cached", "cpu", flags, **common)
    online_flags = [*flags, "--teacher-checkpoint", checkpoint]
    with children_usage() as online_usage:
        online = distill_epoch(extract, folder / "p1-online", "cpu", online_flags, online=True, **common)
    start = time.process_time()
    t_forward, t_step, ideal = ideal_speedup(
        extract,
        checkpoint,
        teacher_name=TEACHER,
        teacher_taps=picks,
        student_name=STUDENT,
        model_kwargs=STUDENT_KWARGS,
        student_layers=STUDENT_LAYERS,
        batch_size=BATCH,
    )
    ideal_cpu = time.process_time() - start
    targets = json.loads((folder / "p1-cached" / "distill.json").read_text())["targets"]
    measured = online["seconds"] / cached["seconds"]
    return {
        "taps": picks,
        "images": round(cached["images_per_second"] * cached["seconds"]),
        "cached": {"seconds": cached["seconds"], "images_per_second": cached["images_per_second"], **cached_usage},
        "cached_targets": targets,
        "online": {"seconds": online["seconds"], "images_per_second": online["images_per_second"], **online_usage},
        "speedup": round(measured, 3),
        "teacher_forward_ms": round(t_forward * 1000, 2),
        "student_step_ms": round(t_step * 1000, 2),
        "ideal_cpu_s": round(ideal_cpu, 2),
        "ideal_speedup": round(ideal, 3),
        "measured_over_ideal": round(measured / ideal, 3),
    }


def streamed_memory(extract: Path, steps: int, folder: Path) -> dict:
    """Distill on the stem tap with its targets in RAM (the default budget holds them) and streamed."""
    runs = {}
    for name, budget in (("in_ram", None), ("streamed", STREAM_GB)):
        out = folder / f"stem-{name}"
        command = [
            KDPIPE, "distill", str(extract), "--student", STUDENT, "--model-kwargs", json.dumps(STUDENT_KWARGS),
            "--teacher-layers", "stem", "--student-layers", "layer1.0", "--steps", str(steps),
            "--batch-size", str(BATCH), "--device", "cpu", "--out", str(out),
        ]  # fmt: skip
        runs[name] = run_measured(command + (["--cache-memory-gb", str(budget)] if budget else []), folder / "d.log")
        summary = json.loads((out / "distill.json").read_text())
        runs[name].update(
            targets=summary["targets"],
            seconds=summary["final"]["seconds"],
            images_per_second=summary["final"]["images_per_second"],
        )
    ram, streamed = runs["in_ram"], runs["streamed"]
    if ram["targets"] != "cache in RAM" or streamed["targets"] != "cache streamed":
        sys.exit(f"expected the stem targets in RAM, then streamed; got {ram['targets']}, {streamed['targets']}")
    return {
        **runs,
        "rss_ratio": round(streamed["peak_rss_mib"] / ram["peak_rss_mib"], 3),
        "speed_ratio": round(streamed["images_per_second"] / ram["images_per_second"], 3),
    }


def extract_overhead(checkpoint: str, num_images: int, num_samples: int, folder: Path) -> dict:
    """P2 at real size: the bare forward, `kdpipe extract` and the CPU profile of the same images, each its own
    process; the stores they write are deleted once measured."""
    bare = run_measured([sys.executable, __file__, "--bare", checkpoint, str(num_images)], folder / "bare.log")
    bare["images_per_second"] = json.loads((folder / "bare.log").read_text().splitlines()[-1])["images_per_second"]
    out = folder / "p2-extract"
    subset = ["--max-samples", str(num_images)] if num_images < num_samples else []
    command = [
        KDPIPE, "extract", "--teacher", TEACHER, "--dataset", DATASET, "--checkpoint", checkpoint,
        "--device", "cpu", "--batch-size", str(BATCH), "--out", str(out), *subset,
    ]  # fmt: skip
    extract = run_measured(command, folder / "extract.log")
    split = json.loads((out / "extract.json").read_text())["splits"]["train"]
    extract.update(
        images_per_second=split["images_per_second"],
        seconds=split["seconds"],
        stored_bytes=split["stored_bytes"],
        raw_bytes=split["raw_bytes"],
    )
    shutil.rmtree(out)
    run_measured([sys.executable, __file__, "--profile", checkpoint, str(num_images), str(folder)], folder / "p.log")
    profile = json.loads((folder / "p.log").read_text().splitlines()[-1])
    shutil.rmtree(folder / "store.zarr")
    return {
        "images": num_images,
        "bare": bare,
        "extract": extract,
        "ratio": round(extract["images_per_second"] / bare["images_per_second"], 3),
        "profile": profile,
    }


def child_bare(checkpoint: str, num_images: int) -> None:
    from p2_extract_overhead import bare_forward_rate

    rate = bare_forward_rate(checkpoint, num_images, BATCH, teacher=TEACHER, dataset=DATASET)
    print(json.dumps({"images_per_second": round(rate, 1)}))


def child_profile(checkpoint: str, num_images: int, folder: str) -> None:
    from p2_profile import profile

    parts, forward, added = profile(checkpoint, num_images, BATCH, Path(folder), teacher=TEACHER, dataset=DATASET)
    ms = {label.strip(): round(1000 * seconds / num_images, 3) for label, seconds in parts}
    per_image = {"forward_ms": 1000 * forward / num_images, "added_ms": 1000 * added / num_images}
    print(json.dumps({"ms_per_image": ms, **per_image}))


def report(figures: dict) -> None:
    """Every figure, then the ratios on the last line."""
    p5, score, p1, memory, p2 = (figures[k] for k in ("storage", "score", "p1", "memory", "p2"))
    print(f"Fashion-MNIST store {figures['store']}: {figures['num_samples']} images, every tap of {TEACHER}")
    print(f"storage: {'tap':10s} {'stored MiB':>11s} {'fp32 MiB':>10s} {'stored/fp32':>12s}")
    rows = [(tap, t["stored_bytes"], t["fp32_bytes"]) for tap, t in p5["taps"].items()]
    for tap, stored, fp32 in [*rows, ("total", p5["stored_bytes"], p5["fp32_bytes"])]:
        print(f"         {tap:10s} {stored / 2**20:11.1f} {fp32 / 2**20:10.1f} {stored / fp32:12.3f}")
    for r in (score["subset"], score["all"]):
        print(
            f"score, {r['num_samples']} rows: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, "
            f"peak RSS {r['peak_rss_mib']} MiB; picks {', '.join(r['selected'])}"
        )
    c, o = p1["cached"], p1["online"]
    print(
        f"P1, {p1['images']} images on {', '.join(p1['taps'])} ({p1['cached_targets']}): cached {c['seconds']:.1f} s "
        f"({c['images_per_second']:.0f} img/s; process {c['wall_s']:.1f} s wall, {c['cpu_s']:.1f} s CPU), online "
        f"{o['seconds']:.1f} s ({o['images_per_second']:.0f} img/s; process {o['wall_s']:.1f} s wall, "
        f"{o['cpu_s']:.1f} s CPU) -> {p1['speedup']:.2f}x; ideal (teacher {p1['teacher_forward_ms']:.1f} ms + "
        f"student {p1['student_step_ms']:.1f} ms) / student = {p1['ideal_speedup']:.2f}x"
    )
    for r in (memory["in_ram"], memory["streamed"]):
        print(
            f"stem-tap distill, {r['targets']}: {r['seconds']:.1f} s ({r['images_per_second']:.0f} img/s), "
            f"process {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_mib']} MiB"
        )
    b, e = p2["bare"], p2["extract"]
    print(
        f"P2, {p2['images']} images: bare forward {b['images_per_second']:.1f} img/s (process {b['wall_s']:.1f} s "
        f"wall, {b['cpu_s']:.1f} s CPU), kdpipe extract {e['images_per_second']:.1f} img/s (process "
        f"{e['wall_s']:.1f} s wall, {e['cpu_s']:.1f} s CPU; {e['stored_bytes'] / 2**30:.2f} GiB stored)"
    )
    print("P2 profile, CPU ms per image:")
    for label, ms in p2["profile"]["ms_per_image"].items():
        print(f"  {label:52s} {ms:6.3f}")
    forward, added = p2["profile"]["forward_ms"], p2["profile"]["added_ms"]
    print(f"  {'extraction on top of the forward':52s} {added:6.3f}; ceiling {forward / (forward + added):.2f}")
    print(
        f"P15 at {figures['num_samples']} images: P1 measured / ideal {p1['measured_over_ideal']:.2f}; "
        f"P2 extract / bare {p2['ratio']:.2f}; score RSS all / {score['subset']['num_samples']} "
        f"{score['rss_ratio']:.2f}; stem streamed / in RAM: RSS {memory['rss_ratio']:.2f}, speed "
        f"{memory['speed_ratio']:.2f}; stored / float32 {p5['ratio']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=STUDY / "extract", help="The study's extract folder.")
    parser.add_argument("--teacher-checkpoint", type=Path, default=STUDY / "teacher" / "model.safetensors")
    parser.add_argument("--extract-images", type=int, default=None, help="Images P2 extracts (default: all).")
    parser.add_argument("--score-subset", type=int, default=10_000, help="Rows of the smaller score run.")
    parser.add_argument("--steps", type=int, default=None, help="Steps of each P1 side (default: an epoch).")
    parser.add_argument("--memory-steps", type=int, default=600, help="Steps of each stem-tap distill.")
    parser.add_argument("--workdir", default=None, help="Where the copy and outputs go (default: a temp dir).")
    parser.add_argument("--json", type=Path, default=None, help="Also write every figure here.")
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--profile", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return child_bare(args.bare[0], int(args.bare[1]))
    if args.profile:
        return child_profile(args.profile[0], int(args.profile[1]), args.profile[2])
    from pipeline.layout import EXTRACT_SUMMARY

    if not (args.store / EXTRACT_SUMMARY).is_file() or not args.teacher_checkpoint.is_file():
        print(f"P15 not measured: it needs the study's complete store ({args.store / EXTRACT_SUMMARY}) and teacher "
              f"({args.teacher_checkpoint}); run `make fashion` (its teach and extract stages) first")  # fmt: skip
        return
    checkpoint = str(args.teacher_checkpoint.resolve())
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="p15-") as tmp:
        folder = Path(tmp)
        extract = linked_copy(args.store.resolve(), folder)
        num_samples = json.loads((extract / EXTRACT_SUMMARY).read_text())["splits"]["train"]["num_samples"]
        figures = {"store": str(args.store), "num_samples": num_samples, "storage": storage(extract)}
        figures["score"] = scoring(extract, min(args.score_subset, num_samples // 2), folder)
        picks = figures["score"]["all"]["selected"]
        figures["p1"] = cache_speedup(extract, checkpoint, picks, args.steps, folder)
        figures["memory"] = streamed_memory(extract, args.memory_steps, folder)
        p2_images = min(args.extract_images or num_samples, num_samples)
        figures["p2"] = extract_overhead(checkpoint, p2_images, num_samples, folder)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    report(figures)


if __name__ == "__main__":
    main()
