"""The `kdpipe` command line: one click command per config class of `pipeline.config`, options generated from it.

Each command resolves its config (`--config FILE` under the flags given) and calls the Python API; only this module
prints. The commands import the stage they run when they run (under another name, since each command bears its
stage's name): the stages import torch, which `kdpipe --help` and a usage error should not wait for.
Library code logs through `logging`; the group's `--quiet` and `-v` set how much of it is shown.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields
from pathlib import Path

import click
from click.core import ParameterSource
from tqdm import tqdm

from cache.errors import StoreError
from cache.holder import LockError
from cache.location import LocationError, is_url, remote_cause, remote_message

from .config import (
    Boolean,
    CommaList,
    Config,
    DatasetsConfig,
    DistillConfig,
    ExtractConfig,
    InfoConfig,
    LayersConfig,
    MethodsConfig,
    ModelsConfig,
    ProbeConfig,
    QTestConfig,
    ReportConfig,
    ScoreConfig,
    StudyConfig,
    SummaryConfig,
    TeachConfig,
    VerifyConfig,
    field_types,
    resolve,
)
from .errors import UserError, filesystem_fault, flag_style, user_message
from .version import __version__

LIBRARY_LOGGERS = ("pipeline", "cache")
MAX_WIDTH = 120  # of the help and of the listings, on a wider terminal too
NAME_COLUMN = 18  # where a listing's descriptions start


class _TqdmHandler(logging.Handler):
    """Log lines on stderr through tqdm, so an open progress bar is redrawn below them instead of broken."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": MAX_WIDTH})
@click.version_option(__version__, prog_name="kdpipe")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only, no progress bars.")
@click.option("-v", "--verbose", count=True, help="Debug messages too.")
def cli(quiet: bool, verbose: int) -> None:
    """kdpipe: offline feature knowledge distillation (extract once, score layers, distill, probe)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if level > logging.DEBUG else "%(name)s: %(message)s"))
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _TqdmHandler)] + [handler]
        logger.setLevel(level)  # above INFO also turns the progress bars off (pipeline.engine.runtime.progress)


def _user_errors(fn: Callable) -> Callable:
    """Turns the pipeline's user errors, an output in use, and a full disk, read-only filesystem or refused permission
    met anywhere, into click's one-line `Error: ...` and exit status 1; they name options as flags."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with flag_style():
                return fn(*args, **kwargs)
        except (UserError, StoreError, LockError, LocationError, OSError) as err:
            fault = filesystem_fault(err) if isinstance(err, OSError) else err
            if fault is None:
                raise
            for bar in list(getattr(tqdm, "_instances", [])):  # so the error starts its own line
                bar.close()
            raise click.ClickException(user_message(fault)) from None

    return wrapper


@contextlib.contextmanager
def _remote_errors(config: Config) -> Iterator[None]:
    """A failure of object storage (no such bucket, no credentials, no connection, refused access), met anywhere in
    the command, as one UserError naming the command's URLs (its store, --out or run) and the storage's reason."""
    try:
        yield
    except (UserError, StoreError, LockError, LocationError, click.exceptions.ClickException, click.exceptions.Exit):
        raise
    except Exception as err:
        urls = [str(getattr(config, f.name)) for f in fields(config) if is_url(getattr(config, f.name))]
        if not urls or not remote_cause(err):
            raise
        raise UserError(f"{', '.join(urls)}: {remote_message(err)}") from err


def click_params(config: type[Config]) -> list[click.Parameter]:
    """The command-line parameters of a config class, field by field: name, type, default and help."""
    params = []
    own = vars(config).get("__annotations__", {})  # the command's own options first, shared ones after
    for f in sorted(fields(config), key=lambda f: f.name not in own):
        if not f.metadata["cli"]:
            continue
        kind, help_text = field_types(config)[f.name], f.metadata["help"]
        default = None if f.default is MISSING else f.default
        if isinstance(kind, CommaList) and default is not None:
            default = ",".join(map(str, default))  # as it would be typed
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["argument"]:
            params.append(click.Argument([f.name], type=kind, default=default, required=f.default is MISSING))
        elif isinstance(kind, Boolean):
            names = [f"{flag}/--no-{flag[2:]}"] if f.metadata["negatable"] else [flag]
            params.append(
                click.Option(names, is_flag=True, default=default, show_default=f.metadata["negatable"], help=help_text)
            )
        else:
            shown = default not in (None, "")
            params.append(click.Option([flag], type=kind, default=default, show_default=shown, help=help_text))
    return params


def command(config: type[Config]) -> Callable:
    """Makes `fn(config_instance)` the `kdpipe` command of a config class, with `--config FILE` and user errors
    reported in one line. Values given on the command line override the file's, which override the defaults."""

    def bind(fn: Callable[[Config], None]) -> click.Command:
        def callback(config_file: str | None, **values) -> None:
            from .engine import distributed  # imports torch: a command's run needs it, its --help does not

            ctx = click.get_current_context()
            given = {k: v for k, v in values.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
            resolved = resolve(config, config_file, given)
            with _remote_errors(resolved):
                if not config.several_processes:
                    distributed.refuse_several(config.command)
                    return fn(resolved)
                with distributed.joined(config.command) as world:
                    # every rank runs the command; rank 0 reports it, the others' lines would repeat it
                    with contextlib.nullcontext() if world.is_main else contextlib.redirect_stdout(io.StringIO()):
                        fn(resolved)

        config_option = click.Option(
            ["--config", "config_file"],
            type=click.Path(dir_okay=False),
            help="YAML file of defaults (top-level shared keys, or a section per command); flags override it.",
        )
        cmd = click.Command(
            config.command,
            params=[config_option, *click_params(config)],
            callback=_user_errors(callback),
            help=config.__doc__,
        )
        cli.add_command(cmd)
        return cmd

    return bind


@command(ModelsConfig)
def models(config: ModelsConfig) -> None:
    from .models.zoo import list_models, split_namespace

    for name in list_models(config.pattern):
        click.echo(name)
    if not split_namespace(config.pattern)[0]:
        click.echo("timm and torchvision models: kdpipe models 'timm:PATTERN', kdpipe models 'tv:PATTERN'", err=True)


@command(DatasetsConfig)
def datasets(config: DatasetsConfig) -> None:
    from .data.datasets import DATASETS

    names = DATASETS.names(config.pattern)
    width = max(map(len, names), default=0)
    for name in names:
        click.echo(f"{name:{width}s}  splits: {', '.join(DATASETS.get(name).splits)}")


def _described(name: str, text: str) -> str:
    """`name`, then `text` beside it from column NAME_COLUMN on, wrapped to the terminal, whole."""
    width = min(shutil.get_terminal_size().columns, MAX_WIDTH)
    return click.wrap_text(
        text, width, initial_indent=f"{name:{NAME_COLUMN - 1}s} ", subsequent_indent=" " * NAME_COLUMN
    )


def _with_settings(summary: str, settings: dict) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"{summary} [{shown}]" if shown else summary


@command(MethodsConfig)
def methods(config: MethodsConfig) -> None:
    from .data.augment import POLICIES, policy_defaults
    from .distillation.losses import LOSSES, describe
    from .distillation.methods import METHODS, format_terms

    for name in METHODS.names():
        method = METHODS.get(name)
        terms = format_terms(method.spec())
        taps = f"  teacher taps: {method.teacher_taps}" if method.teacher_taps else ""
        click.echo(f"{name:{NAME_COLUMN - 1}s} {terms:24s}{taps}".rstrip())
        click.echo(_described("", method.summary))
    click.echo("\nlosses (set per run with --losses, e.g. '{kd: {temperature: 2}}'):")
    for name in LOSSES.names():
        loss = describe(name)
        click.echo(_described(name, _with_settings(loss["summary"], loss["parameters"])))
    click.echo("\naugmentation policies (--augment, settings with --augment-kwargs):")
    for name in POLICIES.names():
        click.echo(_described(name, _with_settings(POLICIES.summary(name), policy_defaults(name))))


@command(LayersConfig)
def layers(config: LayersConfig) -> None:
    from .models.taps import list_taps
    from .models.zoo import create_model
    from .stages.extract import tap_bytes

    net = create_model(config.model, config.num_classes, input_size=config.input_size, model_kwargs=config.model_kwargs)
    taps = list_taps(net, config.input_size)
    size = f" {'KiB/image':>10s}" if config.bytes else ""
    click.echo(f"{'index':>5}  {'name':28s} {'role':10s} {'layout':26s}{size} shape")
    for tap in taps:
        size = f" {tap_bytes(tap) / 2**10:>10.1f}" if config.bytes else ""
        click.echo(f"{tap.index:>5}  {tap.name:28s} {tap.role:10s} {tap.describe():26s}{size} {tuple(tap.shape)}")
    if config.bytes:
        total = sum(map(tap_bytes, taps))
        click.echo(f"all {len(taps)} taps: {total / 2**10:.1f} KiB per image, before compression")


@command(TeachConfig)
def teach(config: TeachConfig) -> None:
    from .stages.teach import teach as run

    summary = run(config)
    click.echo(
        f"teacher {summary['model']}: {summary['test_split']} top-1 {summary['test_top1']:.2f}% "
        f"-> {summary['checkpoint']}"
    )


@command(ExtractConfig)
def extract(config: ExtractConfig) -> None:
    from .stages.extract import extract as run  # OMP_WAIT_POLICY for extraction is set in pipeline/__init__.py

    summary = run(config)
    for split, s in summary["splits"].items():
        rate = f", {s['images_per_second']:.0f} img/s" if s.get("images_per_second") else ""
        click.echo(
            f"{split}: {s['num_samples']} samples, {s['raw_bytes'] / 2**20:.1f} MiB raw -> "
            f"{s['stored_bytes'] / 2**20:.1f} MiB stored ({s['stored_over_raw']:.2f}){rate}"
        )
    click.echo(f"store: {summary['store']}")


@command(ScoreConfig)
def score(config: ScoreConfig) -> None:
    from .stages.score import format_table
    from .stages.score import score as run

    summary = run(config)
    click.echo(format_table(summary))
    click.echo(
        f"scores: {summary['scores_file']}" + (f"  plot: {summary['plot_file']}" if summary["plot_file"] else "")
    )


def _pairs(summary: dict) -> str:
    pairs = ", ".join(f"{s}->{t}" for s, t in zip(summary["student_taps"], summary["teacher_taps"], strict=True))
    return f" ({pairs})" if pairs else ""


@command(DistillConfig)
def distill(config: DistillConfig) -> None:
    from .stages.distill import distill as run

    summary = run(config)
    if summary.get("checked"):
        click.echo(f"{summary['method']}: {summary['student']}{_pairs(summary)}, {summary['steps']} steps: settings ok")
        return
    final = summary["final"]
    logged = [k for k in final if k.split(".")[0] in summary["losses"]]  # a term, or its parts (block_kd.task)
    losses = "  ".join(f"{k} {final[k]:.5f}" for k in logged)
    accuracy = f"  {summary['test_split']} top-1 {summary['test_top1']:.2f}%" if "test_top1" in summary else ""
    click.echo(
        f"{summary['method']}: {summary['student']}{_pairs(summary)}, epoch {final['epoch']}  {losses}{accuracy} -> "
        f"{summary['weights']}"
    )


@command(ProbeConfig)
def probe(config: ProbeConfig) -> None:
    from .stages.probe import probe as fit

    summary = fit(config)
    click.echo(
        f"probe on {summary['tap']} ({summary['embedding_dim']}-d, weight decay {summary['weight_decay']}): "
        f"{summary['test_split']} top-1 {summary['test_top1']:.2f}% -> {summary['classifier']}"
    )


@command(ReportConfig)
def report(config: ReportConfig) -> None:
    from .layout import REPORT_TEXT
    from .stages.report import format_budget_table, format_table
    from .stages.report import report as run

    summary = run(config)
    click.echo(summary["setting"])
    click.echo(format_table(summary["methods"]))
    if summary["note"]:
        click.echo(summary["note"])
    if "sweep" in summary:
        click.echo("top-1 % by label fraction (mean ± std over seeds):")
        click.echo(format_budget_table(summary["sweep"]["fractions"]))
    click.echo(f"report: {Path(config.out) / REPORT_TEXT}")


@command(QTestConfig)
def q_test(config: QTestConfig) -> None:
    from .layout import Q_TEST_TEXT
    from .stages.qtest import format_predictor_table, format_set_table, q_test, verdict

    summary = q_test(config)
    click.echo(summary["setting"])
    click.echo(format_predictor_table(summary))
    click.echo(verdict(summary))
    click.echo(format_set_table(summary["sets"]))
    click.echo(f"q-test: {Path(config.out) / Q_TEST_TEXT}")


@command(StudyConfig)
def study(config: StudyConfig) -> None:
    from .stages.study import study as run

    for stage, done in run(config.file).items():
        click.echo(f"{stage}: done in {done['seconds']:.0f} s")


@command(SummaryConfig)
def summary(config: SummaryConfig) -> None:
    from .stages.summary import summarize

    click.echo(summarize(config.folder))


@command(VerifyConfig)
def verify(config: VerifyConfig) -> None:
    from cache.verify import SOUND, verify_store

    from .engine.runtime import progress

    verdict = verify_store(config.store, config.repair, progress)
    for problem in verdict.problems:
        click.echo(problem)
    if verdict.problems:  # exit status 1 (cache.verify.DAMAGED)
        hint = "marked for recomputation: rerun the same kdpipe extract" if config.repair else "--repair marks them"
        count = len(verdict.problems)
        more = f" (and {count - 1} more, listed above)" if count > 1 else ""
        raise UserError(f"{verdict.store.path}: {verdict.problems[0]}{more}; {hint}")
    state = "complete" if verdict.status == SOUND else "incomplete (resume with the same kdpipe extract)"
    click.echo(
        f"{verdict.store.path}: {verdict.checked} chunks read, all checksums good, all values sound; store {state}"
    )
    if config.recompute:
        _recompute(config)
    click.get_current_context().exit(verdict.status)


def _recompute(config: VerifyConfig) -> None:
    """The live teacher against a sample of every view (`pipeline.stages.recompute`): a table, and exit 1 below the
    bar."""
    from .stages.recompute import MIN_COSINE, recompute

    found = recompute(config.store, config.recompute, config.teacher_checkpoint, config.data_root, config.device)
    click.echo(f"{'split':8s} {'view':>4s}  {'array':32s} {'rows':>5s} {'min cosine':>11s} {'mean cosine':>12s}")
    for a in found:
        flag = "" if a.agrees else f"  below {MIN_COSINE}"
        click.echo(
            f"{a.split:8s} {a.view:>4d}  {a.array:32s} {a.rows:>5d} {a.min_cosine:>11.6f} {a.mean_cosine:>12.6f}{flag}"
        )
    failed = [a for a in found if not a.agrees]
    if failed:
        worst = min(failed, key=lambda a: a.min_cosine)
        raise UserError(
            f"{len(failed)} cached arrays disagree with the live teacher: worst {worst.split} view {worst.view} "
            f"{worst.array}, cosine {worst.min_cosine:.6f} < {MIN_COSINE}"
        )
    click.echo(f"recomputed {found[0].rows if found else 0} rows of every view: every cosine >= {MIN_COSINE}")


@command(InfoConfig)
def info(config: InfoConfig) -> None:
    from .stages.info import describe_store

    click.echo(describe_store(config.store))


def main() -> None:
    cli()


if __name__ == "__main__":  # torchrun --nproc-per-node N -m pipeline.cli extract ...
    main()
