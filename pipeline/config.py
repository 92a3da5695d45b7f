"""One frozen dataclass per command: the single source of every option's name, type, default and help.

The click options are generated from these classes (`pipeline.cli`), a YAML config plus command-line overrides
resolve into them, and the Python API takes them: `distill(DistillConfig(store="runs/x/extract"))`. Every value is
converted and checked on construction by the field's click type, the same type that parses the command line, so
a config file, a flag and a Python argument are held to one standard.

A YAML file holds options shared by every command at the top level and a section per command:

    dataset: digits          # every command with a `dataset` option takes it
    teach:
      epochs: 15             # only `kdpipe teach` takes this

Positional arguments (STORE, RUN, MODEL) come from the command line only.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import click
import yaml

from cache.location import LOCAL_ONLY, is_object_storage
from cache.schema import DEFAULT_COMPRESSION

from .data.fingerprint import FINGERPRINT_MODES, SAMPLED_FILES, SMALL_TREE_BYTES, SMALL_TREE_FILES
from .errors import UserError, shown
from .layout import Q_TEST_PLOT, REPORT_BUDGET_PLOT, REPORT_PLOT, SCORES_PLOT
from .registry import UnknownName

# Nothing here imports torch (the registries' modules do, when a name is converted): `kdpipe --help` and the
# configs' declarations load in a fraction of a second (benchmarks/p16_cli_start.py).

DEVICE_NAMES = ["auto", "cpu", "cuda"] + [f"cuda:{i}" for i in range(8)]
AMP_MODES = ("off", "bf16", "fp16")  # `pipeline.engine.precision` runs them


class ConfigError(UserError):
    """A value that its option's type refuses (or a name no option has), named by the option."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(f"{option}: {message}" if option else message)
        self.option, self.reason = option, message


# ---------------------------------------------------------------------------------------------------------------
# Types: click parameter types that also take the values YAML produces (numbers, booleans, lists, mappings), and
# refuse what the command line could never give (a list where a number is expected, `true` for an integer).


class Integer(click.IntRange):
    """An integer, optionally bounded; refuses booleans and non-integral numbers instead of truncating them."""

    name = "integer"

    def convert(self, value: Any, param, ctx) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            self.fail(f"{shown(value)} is not a valid integer", param, ctx)
        return super().convert(value, param, ctx)


class Number(click.FloatRange):
    """A float, optionally bounded; refuses booleans."""

    name = "float"

    def convert(self, value: Any, param, ctx) -> float:
        if isinstance(value, bool):
            self.fail(f"{shown(value)} is not a valid float", param, ctx)
        return super().convert(value, param, ctx)


class Boolean(click.types.BoolParamType):
    """true/false; strings as click reads them (yes, no, 1, 0)."""

    def convert(self, value: Any, param, ctx) -> bool:
        if isinstance(value, bool):
            return value
        if not isinstance(value, str):
            self.fail(f"{shown(value)} is not a valid boolean", param, ctx)
        return super().convert(value, param, ctx)


class CommaList(click.ParamType):
    """`a,b,c` on the command line, or a YAML list in a config file."""

    name = "LIST"
    collection = True

    def __init__(self, item: click.ParamType | None = None) -> None:
        self.item = item

    def convert(self, value: Any, param, ctx) -> tuple:
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]  # a YAML `seeds: 3`
        else:
            self.fail(f"{shown(value)} is not a comma-separated list", param, ctx)
        if self.item is None:
            return tuple(str(v) for v in items)
        return tuple(self.item.convert(v, param, ctx) for v in items)


class ItemList(CommaList):
    """A list of at least one `item`; a bad or missing item is refused naming what the list must hold."""

    def __init__(self, item: click.ParamType, holds: str) -> None:
        super().__init__(item)
        self.holds = holds

    def convert(self, value: Any, param, ctx) -> tuple:
        try:
            items = super().convert(value, param, ctx)
        except click.BadParameter:
            items = ()
        if not items:
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            self.fail(f"{shown!r} is not a comma-separated list of {self.holds}", param, ctx)
        return items


class SeedList(ItemList):
    """Seeds >= 0, at least one."""

    def __init__(self) -> None:
        super().__init__(Integer(min=0), "seeds >= 0")


class FractionList(ItemList):
    """Fractions in (0, 1], at least one (label fractions)."""

    def __init__(self) -> None:
        super().__init__(Number(min=0, max=1, min_open=True), "fractions in (0, 1]")


class MappingType(click.ParamType):
    """A YAML/JSON mapping on the command line (`'{base_width: 8}'`), or a mapping in a config file."""

    name = "MAPPING"
    collection = True

    def convert(self, value: Any, param, ctx) -> dict[str, Any]:
        parsed = value
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
        if not isinstance(parsed, dict):
            self.fail(f"{shown(value)} is not a mapping such as '{{base_width: 8}}'", param, ctx)
        return dict(parsed)


class Location(click.Path):
    """Where a command reads or writes: a path (checked as `click.Path` checks it), or an fsspec URL
    (`s3://bucket/key`) passed on as given; a value that is neither (a number or a list from YAML) is refused. A
    command that reads and writes local folders only (`object_storage` False) refuses a URL of object storage in one
    line, before anything runs, never taking it for a local folder named after its scheme (`s3:`); `local_only` says
    what it does locally."""

    name = "location"

    def __init__(self, object_storage: bool = True, local_only: str = LOCAL_ONLY, **path_checks: Any) -> None:
        super().__init__(**path_checks)
        self.object_storage, self.local_only = object_storage, local_only

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, (str, os.PathLike)):
            self.fail(f"expected a path, not {shown(value)}", param, ctx)
        if not is_object_storage(value):
            return super().convert(value, param, ctx)
        if not self.object_storage:
            command = f"kdpipe {ctx.command.name}" if ctx else "this command"
            self.fail(f"{value}: {command} {self.local_only}", param, ctx)
        return value


CHECKPOINT = Location(dir_okay=False)  # weights: a local file, or an object on storage
DATA_LOCAL_ONLY = "reads datasets from a local folder only, not from object storage"


class Registered(click.ParamType):
    """A name that a registry holds (`pipeline.registry`), e.g. `Registered("pipeline.distillation.methods",
    "METHODS")`; an unknown one is refused with the closest registered name. The registry's module is imported when a
    value is converted, not when the option is declared: it imports torch, which `kdpipe --help` should not wait for.
    `namespaced` lets a name with a library prefix (`timm:resnet18`) through: that library checks it on use."""

    name = "name"

    def __init__(self, module: str, registry: str, namespaced: bool = False) -> None:
        self.module, self.registry, self.namespaced = module, registry, namespaced

    def convert(self, value: Any, param, ctx) -> str:
        value = str(value)
        if self.namespaced and ":" in value:
            return value
        try:
            getattr(importlib.import_module(self.module), self.registry).get(value)
        except UnknownName as err:
            self.fail(str(err), param, ctx)
        return value


class LossTerms(MappingType):
    """`{loss: weight}` or `{loss: {weight: w, <hyperparameter>: value}}` per registered loss, checked against the
    loss's constructor; normalised to `{loss: {weight?, **hyperparameters}}`."""

    def convert(self, value: Any, param, ctx) -> dict[str, dict[str, Any]]:
        from .distillation.losses import (  # imports torch: on use, not when the option is declared
            LOSSES,
            loss_parameters,
        )

        terms = {}
        for loss, settings in super().convert(value, param, ctx).items():
            try:
                factory = LOSSES.get(loss)
            except UnknownName as err:
                self.fail(str(err), param, ctx)
            settings = {"weight": settings} if not isinstance(settings, dict) else dict(settings)
            accepted = loss_parameters(factory)
            checked = {}
            for name, setting in settings.items():
                if name != "weight" and name not in accepted:
                    known = ", ".join(["weight", *accepted])
                    self.fail(f"loss {loss!r} has no setting {name!r}; it takes {known}", param, ctx)
                kind = Number(min=0) if name == "weight" else type_of(accepted[name].annotation, accepted[name].default)
                checked[name] = kind.convert(setting, param, ctx)
            try:
                factory(**{k: v for k, v in checked.items() if k != "weight"})
            except UserError as err:
                self.fail(str(err), param, ctx)
            terms[loss] = checked
        return terms


class Settings(MappingType):
    """Another command's settings by option name (report's `distill` and `probe`), converted by that command's
    types; its positional arguments are the composing command's to give."""

    def __init__(self, config: type[Config]) -> None:
        self.config = config

    def convert(self, value: Any, param, ctx) -> dict[str, Any]:
        try:
            return convert_values(self.config, super().convert(value, param, ctx), arguments=False)
        except ConfigError as err:
            self.fail(str(err), param, ctx)


def type_of(annotation: Any, default: Any = None) -> click.ParamType:
    """The click type for a field's annotation (`int`, `float | None`, `tuple[str, ...]`, `dict`, ...)."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    if annotation is None and default is not None:
        origin = type(default)
    kinds = {
        bool: Boolean(),
        int: Integer(),
        float: Number(),
        str: click.STRING,
        tuple: CommaList(),
        dict: MappingType(),
    }
    if origin is tuple and typing.get_args(annotation)[:1] == (int,):
        return CommaList(Integer())
    if origin not in kinds:
        raise TypeError(f"no option type for {annotation!r}")
    return kinds[origin]


# ---------------------------------------------------------------------------------------------------------------
# Fields


def option(
    default: Any = MISSING,
    help: str = "",
    type: click.ParamType | None = None,
    *,
    argument: bool = False,
    negatable: bool = True,
    cli: bool = True,
    spec: bool = False,
) -> Any:
    """A config field: its default, help and click type; `argument` makes it positional (command line only),
    `negatable` gives a boolean both `--x` and `--no-x`, `cli=False` keeps it out of the command line, and `spec`
    records it in a run's spec (compared on `--resume`)."""
    metadata = {"help": help, "type": type, "argument": argument, "negatable": negatable, "cli": cli, "spec": spec}
    return field(default=default, metadata=metadata)


@functools.cache
def field_types(config: type[Config]) -> dict[str, click.ParamType]:
    hints = typing.get_type_hints(config)
    return {f.name: f.metadata.get("type") or type_of(hints[f.name], f.default) for f in fields(config)}


@functools.cache
def option_kinds() -> dict[str, type]:
    """Every command's options by field name, as bool, int, float or str: how a user error names one to a Python
    caller (`pipeline.errors.keywords`)."""
    kinds = {Boolean: bool, Integer: int, Number: float}
    return {
        name: next((kind for base, kind in kinds.items() if isinstance(param, base)), str)
        for config in COMMANDS.values()
        for name, param in field_types(config).items()
    }


def convert_value(config: type[Config], f: Field, value: Any) -> Any:
    kind = field_types(config)[f.name]
    if isinstance(value, (list, tuple, dict)) and not getattr(kind, "collection", False):
        raise ConfigError(f"expected a single value, not {shown(value)}", f.name)
    try:
        return kind.convert(value, None, None)
    except click.BadParameter as err:
        raise ConfigError(err.message, f.name) from None
    except (TypeError, ValueError) as err:  # a type click did not expect (a mapping given as a path)
        raise ConfigError(f"{shown(value)} is not a valid {kind.name} ({err})", f.name) from None


def convert_values(config: type[Config], values: Mapping[str, Any], arguments: bool = True) -> dict[str, Any]:
    """`values` by option name (dashes or underscores), each converted by its type; unknown names are errors."""
    accepted = {f.name: f for f in fields(config) if arguments or not f.metadata["argument"]}
    converted = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in accepted:
            raise ConfigError(f"`{config.command}` has no option {name!r}")
        converted[name] = None if value is None else convert_value(config, accepted[name], value)
    return converted


# ---------------------------------------------------------------------------------------------------------------
# The configs

COMMANDS: dict[str, type[Config]] = {}


def command(name: str):
    """Registers a config class as the options of `kdpipe NAME`."""

    def mark(config: type[Config]) -> type[Config]:
        config.command = name
        COMMANDS[name] = config
        return config

    return mark


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of the command configs: every field converted and checked by its type on construction."""

    command: ClassVar[str]
    several_processes: ClassVar[bool] = False  # runs as N torchrun processes (`pipeline.engine.distributed`)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.default is MISSING:
                    raise ConfigError("is required", f.name)
                continue
            object.__setattr__(self, f.name, convert_value(type(self), f, value))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), as written to `<command>_args.yaml`."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def spec_fields(cls) -> set[str]:
        """The options a run's spec records (`option(spec=True)`)."""
        return {f.name for f in fields(cls) if f.metadata["spec"]}

    def run_settings(self) -> dict[str, Any]:
        """The settings recorded in a run's spec (`option(spec=True)`), by option name; unset model kwargs as {}, the
        same model."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name in self.spec_fields()}
        if "model_kwargs" in settings:
            settings["model_kwargs"] = settings["model_kwargs"] or {}
        return settings


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# Options several commands share, each default written once here.

MODEL = Registered("pipeline.models.zoo", "MODELS", namespaced=True)
DATASET = Registered("pipeline.data.datasets", "DATASETS")


def _device() -> Any:
    return option("auto", "Device: auto picks CUDA when present.", click.Choice(DEVICE_NAMES))


def _seed() -> Any:
    return option(0, "Seed; the same inputs and seed give the same outputs.", Integer(min=0), spec=True)


def _workers() -> Any:
    return option(0, "DataLoader workers.", Integer(min=0))


def _data_root(default_from: str = "") -> Any:
    recorded = f" (default: the one {default_from} recorded)" if default_from else ""
    local = Location(object_storage=False, local_only=DATA_LOCAL_ONLY, file_okay=False)
    return option(None, f"Folder holding the dataset's files{recorded}.", local)


def _fingerprint() -> Any:
    return option(
        "auto",
        "Dataset fingerprint: auto hashes in-memory datasets whole, and image folders of up to "
        f"{SMALL_TREE_FILES:,} files and {SMALL_TREE_BYTES // 2**20} MiB by every file's path, size and content "
        f"(larger ones: every path, size and mtime, and {SAMPLED_FILES:,} files' content); full hashes every file's "
        "content. A later stage recomputes the scheme its store records, and with full refuses a sampled one.",
        click.Choice(FINGERPRINT_MODES),
    )


def _model_kwargs(spec: bool = False) -> Any:
    return option(None, "Extra keyword arguments for the model factory, e.g. '{base_width: 8}'.", spec=spec)


def _teacher(spec: bool = False) -> Any:
    return option("resnet20", "Teacher model (`kdpipe models`).", MODEL, spec=spec)


def _input_size(default: int | None = None) -> Any:
    return option(default, "Served image size (default: the dataset's).", Integer(min=8))


def _normalization() -> Any:
    return option(
        "model",
        "Preprocessing of the teacher's images: model takes a timm model's pretrained mean, std, interpolation and "
        "crop_pct (other models: the dataset's statistics); dataset always the dataset's.",
        click.Choice(["model", "dataset"]),
    )


def _augment(purpose: str) -> Any:
    policy = Registered("pipeline.data.augment", "POLICIES")
    return option(None, f"Augmentation policy (`kdpipe methods` lists them) {purpose}.", policy)


def _augment_kwargs() -> Any:
    return option(
        None,
        "The policy's settings, e.g. '{padding: 2, flip: 0.5}', plus interpolation and antialias (default: the "
        "preprocessing's interpolation, antialiased).",
    )


def _layers(help: str) -> Any:
    return option((), help)


def _plot(name: str) -> Any:
    return option(True, f"Write {name}.")


def _resume() -> Any:
    return option(False, "Continue the run in OUT from its last checkpoint.", negatable=False)


def _checkpoint_seconds() -> Any:
    return option(
        60.0,
        "Checkpoint after an epoch once this long has passed since the last (0: every epoch), and at the end.",
        Number(min=0),
    )


def _positive() -> click.ParamType:
    return Number(min=0, min_open=True)


@dataclass(frozen=True, kw_only=True)
class DataOptions(Config):
    dataset: str = option("digits", "Registered dataset (`kdpipe datasets`).", DATASET)
    data_root: str | None = _data_root()
    input_size: int | None = _input_size()
    download: bool = option(False, "Let torchvision download (needs internet).")
    fingerprint: str = _fingerprint()
    workers: int = _workers()


@dataclass(frozen=True, kw_only=True)
class RunOptions(Config):
    device: str = _device()
    seed: int = _seed()


@dataclass(frozen=True, kw_only=True)
class SpeedOptions(Config):
    """How the model's forward (and backward) passes run: their precision and memory layout
    (`pipeline.engine.precision`)."""

    amp: str = option(
        "off",
        "Mixed precision (torch.autocast) for the teacher's and the student's forward passes: bf16, or fp16 (CUDA "
        "only; training scales its loss). It changes the outputs a little, so a store and a run record it "
        "(docs/pipeline.md has the measured difference).",
        click.Choice(AMP_MODES),
    )
    channels_last: bool = option(
        False,
        "Models and image batches in channels-last memory format (on the CPU, bf16 needs it to be fast).",
        negatable=False,
    )
    cudnn_benchmark: bool = option(
        True,
        "On CUDA: let cuDNN time its convolution algorithms per input shape and keep the fastest (the choice, so the "
        "last bits of a result, may differ run to run); nothing on the CPU.",
    )


@command("teach")
@dataclass(frozen=True, kw_only=True)
class TeachConfig(DataOptions, RunOptions, SpeedOptions):
    """Train a teacher with cross entropy; writes OUT/model.safetensors and OUT/teach.json."""

    teacher: str = _teacher(spec=True)
    model_kwargs: dict | None = _model_kwargs(spec=True)
    normalization: str = _normalization()
    out: str = option("runs/teacher", "Output folder (local).", Location(object_storage=False, file_okay=False))
    epochs: int = option(15, "Epochs.", Integer(min=1), spec=True)
    batch_size: int = option(128, "Batch size.", Integer(min=1), spec=True)
    lr: float = option(0.01, "OneCycle peak learning rate.", _positive(), spec=True)
    weight_decay: float = option(0.01, "AdamW weight decay.", Number(min=0), spec=True)
    overwrite: bool = option(False, "Replace the weights and checkpoints already in OUT.", negatable=False)
    resume: bool = _resume()
    checkpoint_seconds: float = _checkpoint_seconds()


@command("extract")
@dataclass(frozen=True, kw_only=True)
class ExtractConfig(DataOptions, RunOptions, SpeedOptions):
    """Run the teacher once over the split(s) and cache tap features, labels and logits in a Zarr store."""

    several_processes: ClassVar[bool] = True

    teacher: str = _teacher()
    checkpoint: str | None = option(
        None,
        "Teacher weights: .safetensors, or a torch file (.pt/.pth/.pth.tar) read with weights_only=True.",
        CHECKPOINT,
    )
    checkpoint_key: str | None = option(
        None,
        "Entry of the checkpoint holding the state dict (default: the first of state_dict_ema, model_ema, "
        "state_dict, model, else the file itself).",
    )
    pretrained: bool = option(False, "timm/torchvision weights from the local cache.")
    model_kwargs: dict | None = _model_kwargs()
    normalization: str = _normalization()
    splits: tuple[str, ...] = option(("train",), "Splits to cache, e.g. train,test.")
    layers: tuple[str, ...] = _layers(
        "Taps to cache by module path (default: all); picked:PATH stands for the taps `kdpipe score` picked in the "
        "store at PATH (a sample of this dataset: the two-pass route), stage-ends for the teacher's stage ends."
    )
    logits: bool = option(True, "Also cache the teacher's logits.")
    views: int = option(
        1,
        "Views cached per training image: view 0 the plain image, views 1..K-1 drawn from --augment (their "
        "parameters stored, seeded per image and view).",
        Integer(min=1),
    )
    augment: str | None = _augment("the augmented views are drawn from")
    augment_kwargs: dict | None = _augment_kwargs()
    max_samples: int | None = option(None, "Cache a seeded class-stratified subset per split.", Integer(min=1))
    out: str = option(
        "runs/extract", "Folder for features.zarr and extract.json (a path or URL).", Location(file_okay=False)
    )
    batch_size: int = option(64, "Batch size.", Integer(min=1))
    compression: str = option(
        DEFAULT_COMPRESSION,
        "Blosc CNAME[:LEVEL[:SHUFFLE]] for feature chunks, or none (see benchmarks/p5_storage.py).",
    )
    overwrite: bool = option(False, "Replace a store in OUT made with a different configuration.", negatable=False)
    max_store_gb: float | None = option(
        None,
        "Refuse to start when the store would exceed this many GiB raw (before compression, which only shrinks it).",
        _positive(),
    )


@command("score")
@dataclass(frozen=True, kw_only=True)
class ScoreConfig(Config):
    """Knowledge quality Q = S + sqrt(I*E) of each cached tap of STORE; picks the top-k taps."""

    store: str = option(help="Feature store (an extract folder; a path or URL).", type=Location(), argument=True)
    split: str = option("train", "Split whose features are scored.")
    layers: tuple[str, ...] = _layers("Taps to score (default: every cached tap).")
    top_k: int = option(4, "Number of taps to select.", Integer(min=1))
    max_samples: int | None = option(None, "Score a seeded class-stratified subset of the cache.", Integer(min=2))
    memory_gb: float = option(
        4.0, "Memory for subset B at a time; larger subsets are read in class groups.", _positive()
    )
    workers: int = option(2, "Threads reading chunks (per tap, in each dask worker too).", Integer(min=1))
    device: str = _device()
    scheduler: str | None = option(
        None,
        "Score the taps on a running dask.distributed scheduler (tcp://HOST:8786); its workers must reach the store "
        "by the same path and have kdpipe installed.",
    )
    dask_workers: int | None = option(
        None,
        "Score the taps on a local dask.distributed cluster of N workers, started and closed by kdpipe.",
        Integer(min=1),
    )
    dask_processes: bool = option(True, "With --dask-workers: a process per worker (else threads of this process).")
    plot: bool = _plot(SCORES_PLOT)
    seed: int = _seed()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scheduler is not None and self.dask_workers is not None:
            raise ConfigError(
                "--scheduler and --dask-workers exclude each other: a running scheduler or a local cluster, not both"
            )


@command("distill")
@dataclass(frozen=True, kw_only=True)
class DistillConfig(RunOptions, SpeedOptions):
    """Train a student from STORE: its backbone on cached teacher features only (default), or a baseline."""

    several_processes: ClassVar[bool] = True

    store: str = option(help="Feature store (an extract folder; a path or URL).", type=Location(), argument=True)
    student: str = option("resnet9", "Student model (`kdpipe models`).", MODEL, spec=True)
    method: str = option(
        "feature",
        "Distillation method (`kdpipe methods`).",
        Registered("pipeline.distillation.methods", "METHODS"),
        spec=True,
    )
    losses: dict | None = option(
        None,
        "Loss terms' weights and settings, e.g. '{kd: {temperature: 2}}' or '{feature_cosine: 0.5}' (a weight adds "
        "a term, 0 drops it; settings alone apply where the method has the term).",
        LossTerms(),
    )
    teacher_layers: tuple[str, ...] = _layers(
        "Teacher taps (default: the store's top-k by Q, or the stage ends for feature-standard and fitnet)."
    )
    student_layers: tuple[str, ...] = _layers(
        "Student taps, paired in depth order (default: the student's k deepest stage ends)."
    )
    model_kwargs: dict | None = _model_kwargs(spec=True)
    dataset: str | None = option(
        None, "Dataset to pair with the store (default: the one it was extracted from).", DATASET
    )
    data_root: str | None = _data_root("STORE")
    fingerprint: str = _fingerprint()
    out: str = option("runs/distill", "Output folder (a path or URL).", Location(file_okay=False))
    epochs: int = option(20, "Epochs (without --steps).", Integer(min=1))
    steps: int | None = option(
        None,
        "Optimizer steps in all, overriding --epochs: one budget for methods that train on different row counts.",
        Integer(min=1),
    )
    batch_size: int = option(128, "Batch size.", Integer(min=1), spec=True)
    lr: float = option(0.05, "OneCycle peak learning rate.", _positive(), spec=True)
    weight_decay: float = option(0.01, "AdamW weight decay.", Number(min=0), spec=True)
    label_fraction: float = option(
        1.0,
        "Seeded class-stratified fraction of the train split that is labelled: label methods and the probe use "
        "only it.",
        Number(min=0, max=1, min_open=True),
        spec=True,
    )
    unlabelled_distill: bool = option(
        True,
        "Feature methods distill on every train sample (labels unused), or only on the labelled subset.",
        spec=True,
    )
    cache_memory_gb: float = option(
        4.0, "Hold cached targets in RAM up to this size; stream them by chunk beyond it.", Number(min=0)
    )
    online_teacher: bool = option(
        False,
        "Run the teacher on every batch instead of reading cached targets (same taps and loss).",
        negatable=False,
        spec=True,
    )
    teacher_checkpoint: str | None = option(
        None,
        "Teacher weights for --online-teacher and block-kd (default: the path recorded in the store).",
        CHECKPOINT,
    )
    views: int | None = option(
        None,
        "Cached views to draw from: each epoch every image is seen under one of the store's first V views "
        "(default: all of them).",
        Integer(min=1),
    )
    augment: str | None = _augment(
        "for fresh views every epoch, with --online-teacher (the reference a cache of views is measured against)"
    )
    augment_kwargs: dict | None = _augment_kwargs()
    workers: int = _workers()
    sync_batchnorm: bool = option(
        False,
        "Under torchrun on CUDA: BatchNorm statistics over the whole batch (SyncBatchNorm), not each process's share.",
        negatable=False,
    )
    resume: bool = _resume()
    checkpoint_seconds: float = _checkpoint_seconds()
    check: bool = option(
        False, "Check the settings against STORE and OUT, then exit without training.", negatable=False
    )


@command("probe")
@dataclass(frozen=True, kw_only=True)
class ProbeConfig(RunOptions):
    """Freeze RUN's distilled backbone, fit a linear head on its pooled features, report top-1."""

    run: str = option(help="A distill output folder (a path or URL).", type=Location(file_okay=False), argument=True)
    tap: str | None = option(None, "Student tap to probe (default: the last distilled one).")
    data_root: str | None = _data_root("RUN")
    fingerprint: str = _fingerprint()
    batch_size: int = option(256, "Batch size.", Integer(min=1))
    max_iter: int = option(300, "L-BFGS iterations.", Integer(min=1))
    workers: int = _workers()


@dataclass(frozen=True, kw_only=True)
class DistillRunsOptions(Config):
    """The options of a command that runs distill and probe many times against one store (report, q-test): the
    config's distill and probe sections for every run, and one device for all of them."""

    composes: ClassVar[tuple[str, ...]] = ("distill", "probe")

    device: str | None = option(
        None, "Device for every run (default: the distill and probe sections' own).", click.Choice(DEVICE_NAMES)
    )
    distill: dict | None = option(None, "kdpipe distill settings for every run.", Settings(DistillConfig), cli=False)
    probe: dict | None = option(None, "kdpipe probe settings for every run.", Settings(ProbeConfig), cli=False)


@command("report")
@dataclass(frozen=True, kw_only=True)
class ReportConfig(DistillRunsOptions):
    """Run (or reuse) every method over the seeds against STORE with the config's distill and probe settings;
    write report.md, report.json and report.png, and print the table."""

    store: str = option(MISSING, "Feature store (extract folder) every run uses.", Location())
    methods: tuple[str, ...] = option(
        ("ce", "kd", "fitnet", "feature-standard", "feature"),
        "Methods to compare (`kdpipe methods`), each optionally with distill flags joined by + "
        "(feature+no-unlabelled-distill); ce is the baseline of the gains.",
    )
    seeds: tuple[int, ...] = option((0, 1, 2), "Seeds, one run each per method.", SeedList())
    label_fractions: tuple[float, ...] | None = option(
        None,
        "Label budget sweep: every method and seed also runs at each of these fractions of labelled train images, "
        "e.g. 0.05,0.1,1 (at the distill section's own label fraction, the main runs serve); a table per fraction "
        f"and {REPORT_BUDGET_PLOT}.",
        FractionList(),
    )
    out: str = option("runs/report", "Output folder (local).", Location(object_storage=False, file_okay=False))
    plot: bool = _plot(REPORT_PLOT)


@command("q-test")
@dataclass(frozen=True, kw_only=True)
class QTestConfig(DistillRunsOptions):
    """Test Q itself: distill one student per scored teacher tap (that tap alone, into the last of the distill
    section's student layers, which the probe reads) and per k-tap set (Q's top k, the stage ends, random draws, Q's
    bottom k), probe each, and rank-correlate Q, S, I, E and depth with the probed top-1."""

    store: str = option(MISSING, "Scored feature store (extract folder) every run uses.", Location())
    taps: tuple[str, ...] = _layers("Teacher taps to distill one at a time (default: every scored tap).")
    seeds: tuple[int, ...] = option((0, 1), "Seeds, one run each per tap and per tap set.", SeedList())
    random_sets: int = option(
        3, "Random k-tap sets drawn (seeded by the first seed) for the set comparison.", Integer(min=0)
    )
    bootstrap: int = option(
        10_000, "Bootstrap resamples of the taps for the correlations' 95 % intervals.", Integer(min=100)
    )
    out: str = option("runs/q-test", "Output folder (local).", Location(object_storage=False, file_okay=False))
    plot: bool = _plot(Q_TEST_PLOT)


@command("study")
@dataclass(frozen=True, kw_only=True)
class StudyConfig(Config):
    """Run every stage FILE has a section for (teach, extract, score, q-test, report) in that order, continuing or
    reusing what an earlier, interrupted or finished, run of the same FILE left."""

    file: str = option(
        help="Experiment config (YAML) with a section per stage.",
        type=Location(object_storage=False, local_only="reads a local file only"),
        argument=True,
    )


@command("layers")
@dataclass(frozen=True, kw_only=True)
class LayersConfig(Config):
    """List MODEL's taps (generalized layers) in depth order: index, module path, per-sample shape."""

    model: str = option(help="Model name (`kdpipe models`).", type=MODEL, argument=True)
    input_size: int = _input_size(32)
    num_classes: int = option(10, "Classes of the model's head.", Integer(min=1))
    model_kwargs: dict | None = _model_kwargs()
    bytes: bool = option(False, "Also show what each tap costs a store per image (float16, before compression).")


@command("verify")
@dataclass(frozen=True, kw_only=True)
class VerifyConfig(Config):
    """Read every chunk of STORE (checksums, NaN/Inf), check chunk files and splits against the completion flags.
    Exit status: 0 sound, 1 damaged (or not a store), 2 incomplete (resume with the same kdpipe extract)."""

    store: str = option(help="Feature store (an extract folder; a path or URL).", type=Location(), argument=True)
    repair: bool = option(
        False,
        "Mark blocks with damaged or missing chunks unwritten, so that rerunning the same kdpipe extract recomputes "
        "them.",
        negatable=False,
    )
    recompute: int = option(
        0,
        "Also run the live teacher on this many seeded rows of every split and view, replayed from the store (its "
        "stored view parameters, preprocessing and teacher), and require a cosine of at least 0.999 to the cached "
        "values of every tap and the logits.",
        Integer(min=0),
    )
    teacher_checkpoint: str | None = option(
        None, "Teacher weights for --recompute (default: the path recorded in the store).", CHECKPOINT
    )
    data_root: str | None = _data_root("STORE")
    device: str = _device()


@command("models")
@dataclass(frozen=True, kw_only=True)
class ModelsConfig(Config):
    """List the built-in models matching PATTERN; timm:PATTERN lists timm's and tv:PATTERN torchvision's
    classification models (e.g. 'timm:convnext_a*')."""

    pattern: str = option("*", "Shell-style name pattern.", argument=True)


@command("datasets")
@dataclass(frozen=True, kw_only=True)
class DatasetsConfig(Config):
    """List registered datasets and their splits."""

    pattern: str = option("*", "Shell-style name pattern.", argument=True)


@command("methods")
@dataclass(frozen=True, kw_only=True)
class MethodsConfig(Config):
    """List distillation methods (their weighted loss terms and teacher taps), the registered losses and the
    augmentation policies (their settings' defaults)."""


@command("summary")
@dataclass(frozen=True, kw_only=True)
class SummaryConfig(Config):
    """Summarise the stage results found under FOLDER (teach, score, probe) in one table."""

    folder: str = option(
        help="An experiment folder (local).",
        type=Location(object_storage=False, exists=True, file_okay=False),
        argument=True,
    )


@command("info")
@dataclass(frozen=True, kw_only=True)
class InfoConfig(Config):
    """Print a store's taps, shapes, raw and stored sizes, completion and provenance."""

    store: str = option(help="Feature store (an extract folder; a path or URL).", type=Location(), argument=True)


# ---------------------------------------------------------------------------------------------------------------
# YAML files


def load_config(path: str | Path) -> dict[str, Any]:
    """The mapping a config file holds; every top-level key must be a command or an option of some command."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"--config: cannot read {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"--config: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from err
    except yaml.YAMLError as err:
        raise UserError(f"--config: {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must hold a mapping of options")
    options = {f.name for c in COMMANDS.values() for f in fields(c) if not f.metadata["argument"]}
    typos = sorted(str(k) for k in data if k not in COMMANDS and str(k).replace("-", "_") not in options)
    if typos:
        raise UserError(f"{path}: unknown key {typos[0]!r}")
    return data


def file_values(config: type[Config], path: str | Path, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The values a config file gives `config`'s command, converted: shared top-level keys it has an option for,
    then its own section (whose every key must be one of its options), then any sections it composes."""
    data = load_config(path) if data is None else data
    composes = getattr(config, "composes", ())
    accepted = {f.name for f in fields(config) if not f.metadata["argument"] and f.name not in composes}
    section = data.get(config.command) or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: section {config.command!r} must be a mapping")
    unknown = sorted(str(k) for k in section if str(k).replace("-", "_") not in accepted)
    if unknown:
        raise UserError(f"{path}: `{config.command}` has no option {unknown[0]!r}")
    shared = {k: v for k, v in data.items() if k not in COMMANDS and str(k).replace("-", "_") in accepted}
    composed = {name: file_values(COMMANDS[name], path, data) for name in composes}
    try:
        return convert_values(config, {**shared, **section, **composed})
    except ConfigError as err:
        raise UserError(f"{path}: {config.command}.{err}") from None


def resolve(config: type[Config], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None):
    """`config` from a config file (if any) with `overrides` (the command line's values) on top."""
    values = {**(file_values(config, path) if path else {}), **(overrides or {})}
    missing = [f.name for f in fields(config) if f.default is MISSING and values.get(f.name) is None]
    if missing:
        where = f" or `{missing[0]}:` in the `{config.command}` section of {path}" if path else ""
        raise UserError(f"{config.command} needs --{missing[0].replace('_', '-')}{where}")
    return config(**values)
