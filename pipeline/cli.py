"""The `kdpipe` command line: one click command per stage, every option also settable from `--config`."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import click
import yaml
from tqdm import tqdm

from cache.store import DEFAULT_COMPRESSION, StoreError

from . import __version__
from .config import config_option
from .errors import UserError

DEVICES = click.Choice(["auto", "cpu", "cuda"] + [f"cuda:{i}" for i in range(8)])


class CommaList(click.ParamType):
    """`a,b,c` on the command line, or a YAML list in a config file."""

    name = "LIST"

    def convert(self, value: Any, param, ctx) -> tuple[str, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        return tuple(v.strip() for v in str(value).split(",") if v.strip())


class Mapping(click.ParamType):
    """A YAML/JSON mapping on the command line (`'{base_width: 8}'`), or a mapping in a config file."""

    name = "MAPPING"

    def convert(self, value: Any, param, ctx) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = None
        if not isinstance(parsed, dict):
            self.fail(f"{value!r} is not a mapping such as '{{base_width: 8}}'", param, ctx)
        return parsed


def user_errors(fn: Callable) -> Callable:
    """Turns the pipeline's user errors into click's one-line `Error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, StoreError) as err:
            for bar in list(getattr(tqdm, "_instances", [])):  # so the error starts its own line
                bar.close()
            raise click.ClickException(str(err)) from None

    return wrapper


def stage(fn: Callable) -> click.Command:
    """A kdpipe command: user errors handled and `--config` attached."""
    return config_option(cli.command(name=fn.__name__.rstrip("_").replace("_", "-"))(user_errors(fn)))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="kdpipe")
def cli() -> None:
    """kdpipe: offline feature knowledge distillation (extract once, score layers, distill, probe)."""


def data_options(fn: Callable) -> Callable:
    for option in reversed(
        [
            click.option(
                "--dataset", default="digits", show_default=True, help="Registered dataset (`kdpipe datasets`)."
            ),
            click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset's files."),
            click.option("--input-size", type=click.IntRange(8), help="Served image size (default: the dataset's)."),
            click.option("--download/--no-download", default=False, help="Let torchvision download (needs internet)."),
            click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader workers."),
        ]
    ):
        fn = option(fn)
    return fn


def run_options(fn: Callable) -> Callable:
    for option in reversed(
        [
            click.option("--device", type=DEVICES, default="auto", show_default=True),
            click.option("--seed", type=click.IntRange(0), default=0, show_default=True),
        ]
    ):
        fn = option(fn)
    return fn


def model_kwargs_option(fn: Callable) -> Callable:
    return click.option("--model-kwargs", type=Mapping(), help="Extra keyword arguments for the model factory.")(fn)


@stage
@click.argument("pattern", default="*")
def models(pattern: str, config: str | None) -> None:
    """List built-in models matching PATTERN (timm:<name> and tv:<name> also work)."""
    from .models import list_models

    for name in list_models(pattern):
        click.echo(name)


@stage
@click.argument("pattern", default="*")
def datasets(pattern: str, config: str | None) -> None:
    """List registered datasets and their splits."""
    from .datasets import DATASETS

    for name in DATASETS.names(pattern):
        click.echo(f"{name:12s} splits: {', '.join(DATASETS.get(name).splits)}")


@stage
def methods(config: str | None) -> None:
    """List distillation methods: the losses each sums and the teacher taps its feature loss uses."""
    from .methods import METHODS, get_method

    for name in METHODS.names():
        method = get_method(name)
        taps = f"  teacher taps: {method.teacher_taps}" if method.teacher_taps else ""
        summary = METHODS.get(name).__doc__.splitlines()[0]
        click.echo(f"{name:17s} {' + '.join(method.losses):24s}{taps}".rstrip() + f"\n{'':17s} {summary}")


@stage
@click.argument("model")
@click.option("--input-size", type=click.IntRange(8), default=32, show_default=True)
@click.option("--num-classes", type=click.IntRange(1), default=10, show_default=True)
@model_kwargs_option
def layers(model: str, input_size: int, num_classes: int, model_kwargs: dict | None, config: str | None) -> None:
    """List MODEL's taps (generalized layers) in depth order: index, module path, per-sample shape."""
    from .models import create_model
    from .taps import list_taps

    net = create_model(model, num_classes, input_size=input_size, model_kwargs=model_kwargs)
    click.echo(f"{'index':>5}  {'name':24s} {'kind':7s} shape")
    for tap in list_taps(net, input_size):
        click.echo(f"{tap.index:>5}  {tap.name:24s} {tap.kind:7s} {tuple(tap.shape)}")


@stage
@click.option("--teacher", default="resnet20", show_default=True, help="Model to train (`kdpipe models`).")
@data_options
@model_kwargs_option
@click.option("--out", type=click.Path(file_okay=False), default="runs/teacher", show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=15, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.01, show_default=True, help="OneCycle peak.")
@click.option("--weight-decay", type=click.FloatRange(0), default=0.01, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the weights already in OUT.")
@run_options
def teach(config: str | None, **options: Any) -> None:
    """Train a teacher with cross entropy; writes OUT/model.safetensors and OUT/teach.json."""
    from .runtime import write_args
    from .teach import teach as run

    summary = run(**options)
    write_args(Path(options["out"]) / "teach_args.yaml", options)
    click.echo(
        f"teacher {summary['model']}: {summary['test_split']} top-1 {summary['test_top1']:.2f}% "
        f"-> {summary['checkpoint']}"
    )


@stage
@click.option("--teacher", default="resnet20", show_default=True, help="Teacher model (`kdpipe models`).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Teacher weights (.safetensors, or .pt/.pth).")
@click.option("--pretrained/--no-pretrained", default=False, help="timm/torchvision weights from the local cache.")
@model_kwargs_option
@data_options
@click.option(
    "--splits", type=CommaList(), default="train", show_default=True, help="Splits to cache, e.g. train,test."
)
@click.option("--layers", type=CommaList(), default="", help="Taps to cache by module path (default: all).")
@click.option("--logits/--no-logits", default=True, show_default=True, help="Also cache the teacher's logits.")
@click.option("--max-samples", type=click.IntRange(1), help="Cache a seeded class-stratified subset per split.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/extract",
    show_default=True,
    help="Folder for features.zarr and extract.json.",
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--compression",
    default=DEFAULT_COMPRESSION,
    show_default=True,
    help="Blosc CNAME[:LEVEL[:SHUFFLE]] for feature chunks, or none (see benchmarks/p5_storage.py).",
)
@click.option("--overwrite", is_flag=True, help="Replace a store in OUT made with a different configuration.")
@run_options
def extract(config: str | None, **options: Any) -> None:
    """Run the teacher once over the split(s) and cache tap features, labels and logits in a Zarr store."""
    # The background writer shares the cores with the teacher; OpenMP's spinning waits stall the teacher's parallel
    # regions whenever the writer runs. Passive waiting measured +13 % extraction throughput on 2 cores
    # (benchmarks/p2_extract_overhead.py). Only effective before torch is first imported, as in a CLI run.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .extract import extract as run
    from .runtime import write_args

    summary = run(**options)
    write_args(Path(options["out"]) / "extract_args.yaml", options)
    for split, s in summary["splits"].items():
        rate = f", {s['images_per_second']:.0f} img/s" if s.get("images_per_second") else ""
        click.echo(
            f"{split}: {s['num_samples']} samples, {s['raw_bytes'] / 2**20:.1f} MiB raw -> "
            f"{s['stored_bytes'] / 2**20:.1f} MiB stored ({s['stored_over_raw']:.2f}){rate}"
        )
    click.echo(f"store: {summary['store']}")


@stage
@click.argument("store", type=click.Path())
@click.option("--split", default="train", show_default=True, help="Split whose features are scored.")
@click.option("--layers", type=CommaList(), default="", help="Taps to score (default: every cached tap).")
@click.option("--top-k", type=click.IntRange(1), default=4, show_default=True, help="Number of taps to select.")
@click.option("--max-samples", type=click.IntRange(2), help="Score a seeded class-stratified subset of the cache.")
@click.option(
    "--memory-gb",
    type=click.FloatRange(0.01),
    default=4.0,
    show_default=True,
    help="Memory for subset B at a time; larger subsets are read in class groups.",
)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Threads reading chunks.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write scores.png.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
def score(store: str, config: str | None, **options: Any) -> None:
    """Knowledge quality Q = S + sqrt(I*E) of each cached tap of STORE; picks the top-k taps."""
    from .runtime import write_args
    from .score import format_table, score as run

    summary = run(store, **options)
    write_args(Path(summary["store"]).parent / "score_args.yaml", {"store": store, **options})
    click.echo(format_table(summary))


@stage
@click.argument("store", type=click.Path())
@click.option("--student", default="resnet9", show_default=True, help="Student model (`kdpipe models`).")
@click.option(
    "--method",
    default="feature",
    show_default=True,
    help="feature, feature-standard (feature loss only); ce, kd, fitnet, fitnet-kd (with labels); `kdpipe methods`.",
)
@click.option(
    "--teacher-layers",
    type=CommaList(),
    default="",
    help="Teacher taps (default: the store's top-k by Q, or the stage ends for feature-standard and fitnet).",
)
@click.option(
    "--student-layers",
    type=CommaList(),
    default="",
    help="Student taps, paired in depth order (default: k stage ends spread over depth).",
)
@model_kwargs_option
@click.option("--dataset", help="Dataset to pair with the store (default: the one it was extracted from).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset's files.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/distill", show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option(
    "--steps",
    type=click.IntRange(1),
    help="Optimizer steps in all, overriding --epochs: one budget for methods that train on different row counts.",
)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True, help="OneCycle peak.")
@click.option("--weight-decay", type=click.FloatRange(0), default=0.01, show_default=True)
@click.option(
    "--temperature", type=click.FloatRange(0, min_open=True), default=4.0, show_default=True, help="KD temperature T."
)
@click.option(
    "--label-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="Seeded class-stratified fraction of the train split that is labelled: label methods and the probe use "
    "only it.",
)
@click.option(
    "--unlabelled-distill/--no-unlabelled-distill",
    default=True,
    show_default=True,
    help="Feature methods distill on every train sample (labels unused), or only on the labelled subset.",
)
@click.option(
    "--cache-memory-gb",
    type=click.FloatRange(0),
    default=4.0,
    show_default=True,
    help="Hold cached targets in RAM up to this size; stream them by chunk beyond it.",
)
@click.option(
    "--online-teacher",
    is_flag=True,
    help="Run the teacher on every batch instead of reading cached targets (same taps and loss).",
)
@click.option(
    "--teacher-checkpoint",
    type=click.Path(dir_okay=False),
    help="Teacher weights for --online-teacher (default: the path recorded in the store).",
)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option(
    "--checkpoint-seconds",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Checkpoint after an epoch once this long has passed since the last (0: every epoch), and at the end.",
)
@click.option("--check", is_flag=True, help="Check the settings against STORE and OUT, then exit without training.")
@run_options
def distill(store: str, config: str | None, **options: Any) -> None:
    """Train a student from STORE: its backbone on cached teacher features only (default), or a baseline."""
    from .distill import distill as run
    from .runtime import write_args

    summary = run(store, **options)
    pairs = ", ".join(f"{s}->{t}" for s, t in zip(summary["student_taps"], summary["teacher_taps"]))
    pairs = f" ({pairs})" if pairs else ""
    if summary.get("checked"):
        click.echo(f"{summary['method']}: {summary['model']}{pairs}, {summary['steps']} steps: settings ok")
        return
    write_args(Path(options["out"]) / "distill_args.yaml", {"store": store, **options})
    final = summary["final"]
    losses = "  ".join(f"{k} {final[k]:.5f}" for k in summary["losses"])
    accuracy = f"  {summary['test_split']} top-1 {summary['test_top1']:.2f}%" if "test_top1" in summary else ""
    click.echo(
        f"{summary['method']}: {summary['model']}{pairs}, epoch {final['epoch']}  {losses}{accuracy} -> "
        f"{summary['weights']}"
    )


@stage
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--tap", help="Student tap to probe (default: the last distilled one).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset's files.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--max-iter", type=click.IntRange(1), default=300, show_default=True, help="L-BFGS iterations.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader workers.")
@run_options
def probe(run: str, config: str | None, **options: Any) -> None:
    """Freeze RUN's distilled backbone, fit a linear head on its pooled features, report top-1."""
    from .probe import probe as fit
    from .runtime import write_args

    summary = fit(run, **options)
    write_args(Path(run) / "probe_args.yaml", {"run": run, **options})
    click.echo(
        f"probe on {summary['tap']} ({summary['embedding_dim']}-d, weight decay {summary['weight_decay']}): "
        f"{summary['test_split']} top-1 {summary['test_top1']:.2f}% -> {summary['classifier']}"
    )


@stage
@click.option("--store", type=click.Path(), required=True, help="Feature store (extract folder) every run uses.")
@click.option(
    "--methods",
    type=CommaList(),
    default="ce,kd,fitnet,feature-standard,feature",
    show_default=True,
    help="Methods to compare (`kdpipe methods`), each optionally with distill flags joined by + "
    "(feature+no-unlabelled-distill); ce is the baseline of the gains.",
)
@click.option("--seeds", type=CommaList(), default="0,1,2", show_default=True, help="Seeds, one run each per method.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/report", show_default=True)
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write report.png.")
def report(
    store: str, methods: tuple[str, ...], seeds: tuple[str, ...], out: str, device: str, plot: bool, config: str | None
) -> None:
    """Run (or reuse) every method over the seeds against STORE with the config's distill and probe settings;
    write report.md, report.json and report.png, and print the table."""
    from .report import Stages, format_table, run_all, split_entry, write_report

    if not all(s.isdigit() for s in seeds) or not seeds:
        raise click.BadParameter(
            f"{','.join(seeds)!r} is not a comma-separated list of seeds >= 0", param_hint="--seeds"
        )
    flags = {o for p in distill.params if getattr(p, "is_flag", False) for o in (*p.opts, *p.secondary_opts)}
    unknown = [f for entry in methods for f in split_entry(entry)[1] if f not in flags]
    if unknown:
        raise click.BadParameter(f"{unknown[0]} is not a flag of kdpipe distill", param_hint="--methods")
    shared = ["--config", config] if config else []
    group = click.get_current_context().parent

    def stage_args(*args: str) -> list[str]:
        return [*args, *shared, "--device", device]

    def run_stage(*args: str) -> None:  # through the group, so each stage reads the config as it would alone
        cli.main(stage_args(*args), prog_name="kdpipe", standalone_mode=False)

    def run_distill(method: str, flags: list[str], seed: int, run_dir: Path, resume: bool, check: bool = False):
        args = ["--method", method, *flags, "--seed", str(seed), "--out", str(run_dir)]
        run_stage("distill", store, *args, *["--resume"] * resume, *["--check"] * check)

    def probe_settings(run_dir: Path, seed: int) -> dict[str, Any]:
        args = stage_args(str(run_dir), "--seed", str(seed))
        return probe.make_context("probe", args, parent=group).params

    stages = Stages(
        distill=run_distill,
        probe=lambda run_dir, seed: run_stage("probe", str(run_dir), "--seed", str(seed)),
        probe_settings=probe_settings,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    results = run_all(Path(out), list(methods), [int(s) for s in seeds], stages)
    summary = write_report(Path(out), results, list(methods), plot)
    click.echo(summary["setting"])
    click.echo(format_table(summary["methods"]))
    if summary["note"]:
        click.echo(summary["note"])
    click.echo(f"report: {Path(out) / 'report.md'}")


@stage
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def summary(folder: str, config: str | None) -> None:
    """Summarise the stage results found under FOLDER (teach, score, probe) in one table."""
    from .summary import summarize

    click.echo(summarize(folder))


@stage
@click.argument("store", type=click.Path())
@click.option(
    "--repair",
    is_flag=True,
    help="Mark blocks with damaged or missing chunks unwritten, so that rerunning "
    "the same kdpipe extract recomputes them.",
)
def verify(store: str, repair: bool, config: str | None) -> None:
    """Read every chunk of STORE (checksums), check chunk files against the completion flags."""
    from cache.verify import verify_store

    feature_store, problems, checked = verify_store(store, repair)
    for problem in problems:
        click.echo(problem)
    if problems:
        hint = "marked for recomputation: rerun the same kdpipe extract" if repair else "--repair marks them"
        raise click.ClickException(f"{len(problems)} problems in {feature_store.path}; {hint}")
    state = "complete" if feature_store.complete else "incomplete (resume with the same kdpipe extract)"
    click.echo(f"{feature_store.path}: {checked} chunks read, all checksums good; store {state}")


@stage
@click.argument("store", type=click.Path())
def info(store: str, config: str | None) -> None:
    """Print a store's taps, shapes, raw and stored sizes, completion and provenance."""
    from .info import describe_store

    click.echo(describe_store(store))


def main() -> None:
    cli()
