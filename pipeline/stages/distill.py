"""`kdpipe distill`: train a student backbone against cached teacher features with feature losses only, or a baseline.

The stage wires the parts together: the method and its loss terms (`methods`, `losses`), which taps meet
(`pairing`), the training loop (`training`), and epoch checkpoints (`checkpoints`). A checkpoint is written after an
epoch once `checkpoint_seconds` have passed since the last (and after the last epoch), so `--resume` continues an
interrupted run and reproduces the uninterrupted one exactly. The run's spec (every setting that shapes the result,
as the config and the method resolve it) is stored with each checkpoint and must match on resume. The run folder's
lock is held from the first look at its checkpoints to the end of the run (`check` takes none).

Under torchrun every rank builds the same run, DDP trains it on each rank's share of every batch (`training`), and
rank 0 alone holds the lock and writes the run folder; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cache.location import absolute, location
from cache.lock import lock_output
from cache.reader import CachedTargets
from cache.schema import INDICES, LABELS, LOGITS, PARAMS_ARRAY
from cache.store import FeatureStore, SplitStore

from ..config import DistillConfig
from ..data.augment import Augmentation, ViewImages
from ..data.datasets import SplitData, held_out_split, load_split, stratified_subset
from ..distillation.losses import FrozenTeacher, TermSetup
from ..distillation.methods import Distiller, Method, cached_inputs, get_method, teacher_targets
from ..distillation.pairing import pair_taps, stage_taps
from ..distillation.run_spec import RunSpec
from ..engine import distributed
from ..engine.checkpoints import RunState, resumable, save_checkpoint, start_or_resume, train_epochs
from ..engine.precision import Precision
from ..engine.provenance import load_matching_split, open_complete_store, recorded_data_root
from ..engine.recipe import adamw_onecycle, evaluate_top1, make_loader
from ..engine.runtime import resolve_device, seed_everything, write_args, write_json, write_npy
from ..engine.training import OnlineTeacher, Trainer, store_teacher
from ..errors import UserError
from ..layout import DISTILL_LOG, DISTILL_SUMMARY, LABELLED_INDICES, STUDENT_WEIGHTS, folder_lock
from ..models.spec import ModelSpec
from ..models.taps import Tap
from ..models.zoo import create_model

log = logging.getLogger(__name__)


def distill(config: DistillConfig) -> dict[str, Any]:
    """Trains the student with the method on the store's train split into `config.out`; returns the summary
    (distill.json).

    `steps` fixes the number of optimizer steps (the last epoch is cut short) so that methods training on
    different numbers of rows share one budget; without it the run lasts `epochs` epochs. `check` validates
    everything a run would (store, data, taps, cached arrays, budget, an existing run in `out`) and returns the
    run's spec without training or writing.
    """
    world = distributed.current()
    dev = world.device(resolve_device(config.device))
    _check_processes(config, world, dev)
    method = get_method(config.method).configured(config.losses or {})
    run = _build(config, method, _training_data(config, method), Precision.of(config, dev, training=True), world)
    spec = run.spec.to_json()
    if config.check:
        start_or_resume(run.out_dir, config.resume, spec, run.state, "distill")
        return {"stage": "distill", "checked": True, **spec}
    with contextlib.ExitStack() as held:
        log_rows, first_epoch = world.from_main(lambda: _take_folder(held, run.out_dir, config, spec, run.state))
        if not world.is_main:  # the checkpoint rank 0 found, read alike
            log_rows, first_epoch = start_or_resume(run.out_dir, config.resume, spec, run.state, "distill")
        if _finished(run.out_dir, first_epoch, run.epochs):
            return json.loads((run.out_dir / DISTILL_SUMMARY).read_text())  # a finished run: reused, not recomputed
        start = time.perf_counter()
        with resumable(run.out_dir):
            trainer = _trainer(run, config)
            train_epochs(
                run.out_dir,
                run.state,
                spec,
                log_rows,
                range(first_epoch, run.epochs + 1),
                lambda epoch: trainer.run_epoch(epoch, run.epochs, run.steps_in(epoch)),
                run.out_dir / DISTILL_LOG,
                config.checkpoint_seconds,
                writes=world.is_main,
            )
            # rank 0 writes the run's files; every rank returns its summary
            return world.from_main(lambda: _finish(run, config, trainer.images, log_rows, start))


@dataclass(frozen=True)
class TrainingData:
    """The store's train split, the dataset split it was extracted from, and which of its rows train."""

    store: FeatureStore
    part: SplitStore
    data: SplitData
    data_root: str | None  # where the data was found: recorded for probe
    indices: np.ndarray  # each store row's sample index in `data`
    rows: np.ndarray | None  # the rows trained on; None: all
    labelled: np.ndarray | None  # the rows with labels under a label budget; None: all


@dataclass
class DistillRun:
    """One run, built: the student and its distiller, where its targets come from, its budget and its spec."""

    method: Method
    training: TrainingData
    precision: Precision
    world: distributed.World
    net: nn.Module
    pairs: list[tuple[Tap, Tap]]  # (student tap, teacher tap) of the feature losses
    distiller: Distiller
    model: nn.Module  # what trains the distiller: DDP's wrapper of it, or itself
    teacher: OnlineTeacher | None
    targets: CachedTargets
    fresh: Augmentation | None  # the policy of fresh views (--augment), drawn every epoch
    views: int  # the cached views drawn from
    steps_per_epoch: int
    total_steps: int
    state: RunState
    spec: RunSpec
    out_dir: Path

    @property
    def epochs(self) -> int:
        return self.spec.epochs

    def steps_in(self, epoch: int) -> int:
        """Epoch `epoch`'s optimizer steps: whole epochs, the last one cut short to the step budget."""
        return min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)


def _training_data(config: DistillConfig, method: Method) -> TrainingData:
    """The complete store, the data it matches (checked field by field) and the rows the method trains on."""
    store, part = open_complete_store(config.store)
    data_root = recorded_data_root(config.data_root, store.provenance.data_root, store.path)
    data = load_matching_split(store, "train", config.dataset, data_root, fingerprint=config.fingerprint)
    indices = part.read(INDICES)
    rows, labelled = _training_rows(part, method, config, data.classes)
    _check_classes(data, store, indices, labelled, config.label_fraction)
    return TrainingData(store, part, data, data_root, indices, rows, labelled)


def _build(
    config: DistillConfig, method: Method, training: TrainingData, precision: Precision, world: distributed.World
) -> DistillRun:
    """The student, its taps paired with the teacher's, the distiller with its terms, the targets, the budget and
    the optimizer, and the spec that a resumed run must match."""
    store, part, data = training.store, training.part, training.data
    input_size = data.preprocessing.input_size
    seed_everything(config.seed)
    net = create_model(config.student, data.num_classes, input_size=input_size, model_kwargs=config.model_kwargs)
    student_taps, teacher_taps = pair_taps(
        method, store, part, net, input_size, config.teacher_layers, config.student_layers
    )
    teacher = _online_teacher(config, method, store, teacher_taps, data.num_classes, input_size)
    fresh, views, augmentation = _views(config, method, store, part, data)
    paths = _cached_paths(config, method, store, part, teacher_taps, teacher)
    frozen = _frozen_teacher(method, store, net, config, data.num_classes, input_size)
    distiller = precision.model(Distiller(net, method, TermSetup(student_taps, teacher_taps, frozen)))
    model = world.parallel(distiller, config.sync_batchnorm)
    if teacher:
        precision.model(teacher.model)
    targets = CachedTargets(part, paths, int(config.cache_memory_gb * 2**30), rows=training.rows, views=views)
    steps_per_epoch, total_steps, epochs = _step_budget(
        targets.num_rows, config.batch_size, config.epochs, config.steps, subset=training.rows is not None
    )
    optimizer, schedule = adamw_onecycle(distiller.parameters(), config.lr, config.weight_decay, total_steps)
    spec = RunSpec(
        settings={**_recorded_settings(config, method, training.labelled is not None), **precision.record()},
        losses=method.spec(),
        num_classes=data.num_classes,
        input_size=input_size,
        dataset=data.name,
        store=absolute(store.path),
        store_config_hash=store.provenance.config_hash,
        student_taps=[t.name for t in student_taps],
        teacher_taps=[t.name for t in teacher_taps],
        terms=distiller.record(),
        augmentation=augmentation,
        epochs=epochs,
        steps=total_steps,
        num_labelled=len(training.labelled) if training.labelled is not None else part.num_samples,
        num_training_rows=targets.num_rows,
        target_order=targets.order,
    )
    log.debug(
        "%s: terms %s; student taps %s -> teacher taps %s; targets %s",
        *(method.name, spec.losses, spec.student_taps, spec.teacher_taps, targets.order),
    )
    state = RunState(distiller, optimizer, schedule, scaler=precision.scaler)
    pairs = list(zip(student_taps, teacher_taps, strict=True))
    return DistillRun(
        *(method, training, precision, world, net, pairs, distiller, model, teacher, targets, fresh, views),
        *(steps_per_epoch, total_steps, state, spec, location(config.out)),
    )


def _online_teacher(
    config: DistillConfig, method: Method, store: FeatureStore, teacher_taps: list[Tap], num_classes: int, size: int
) -> OnlineTeacher | None:
    """The teacher run on every batch (`--online-teacher`) when the method reads what it outputs."""
    if not (config.online_teacher and method.reads_teacher):
        return None
    names, logits = [t.name for t in teacher_taps], LOGITS in method.inputs
    return OnlineTeacher.from_store(store, names, config.teacher_checkpoint, num_classes, size, logits)


def _cached_paths(
    config: DistillConfig,
    method: Method,
    store: FeatureStore,
    part: SplitStore,
    teacher_taps: list[Tap],
    teacher: OnlineTeacher | None,
) -> list[str]:
    """The store arrays the method reads from the cache, each checked to be there. Online, the teacher supplies
    what it outputs (features, logits); labels still come from the cache."""
    paths = [p for p in cached_inputs(method, teacher_targets(teacher_taps)) if not (teacher and p in teacher.paths)]
    missing = [p for p in paths if p not in part.array_names]
    if missing:
        raise UserError(
            f"--method={config.method} reads {missing[0]}, which {store.path} does not hold"
            + _why_not_cached(store, missing[0])
        )
    return paths


def _trainer(run: DistillRun, config: DistillConfig) -> Trainer:
    """The epoch runner: the training images by store row under their views, paired with the cached targets."""
    training = run.training
    images = _view_images(
        training.data, training.indices, training.store, training.part, run.fresh, run.views, config.seed
    )
    return Trainer(
        distiller=run.distiller,
        optimizer=run.state.optimizer,
        schedule=run.state.schedule,
        targets=run.targets,
        images=images,
        teacher=run.teacher,
        batch_size=config.batch_size,
        seed=config.seed,
        precision=run.precision,
        workers=config.workers,
        fresh_views=run.fresh is not None,
        world=run.world,
        model=run.model,
    )


def _finish(
    run: DistillRun, config: DistillConfig, images: ViewImages, log_rows: list[dict[str, Any]], start: float
) -> dict[str, Any]:
    """Writes the student's weights (its spec in the header, as teach's), the labelled rows and the summary."""
    training, out_dir = run.training, run.out_dir
    data = training.data
    spec = run.spec.to_json()
    model_spec = ModelSpec(
        config.student,
        run.spec.num_classes,
        run.spec.input_size,
        run.spec.settings["model_kwargs"],
        run.spec.dataset,
        data.preprocessing.to_dict(),
        training.data_root,  # where probe finds the data by default; not compared on --resume
        run=spec,
    )
    save_checkpoint(run.net, out_dir / STUDENT_WEIGHTS, model_spec)
    labelled = training.labelled if training.labelled is not None else slice(None)
    write_npy(out_dir / LABELLED_INDICES, images.indices[labelled])
    own_classifier = run.method.evaluated_with == "own classifier"
    summary = {
        "stage": "distill",
        **spec,
        "data_root": training.data_root,
        "pairs": [
            {"student": s.name, "student_shape": list(s.shape), "teacher": t.name, "teacher_shape": list(t.shape)}
            for s, t in run.pairs
        ],
        "final": log_rows[-1],
        "evaluated_with": run.method.evaluated_with,
        **(_evaluate_classifier(run.net, data, training.data_root, config, run.precision) if own_classifier else {}),
        "targets": _targets_source(run),
        "device": str(run.precision.device),
        # not in the spec: the batches are the same whatever the number, so a run resumes with any
        "processes": run.world.size,
        "seconds_this_run": round(time.perf_counter() - start, 2),
        "weights": str(out_dir / STUDENT_WEIGHTS),
    }
    write_json(out_dir / DISTILL_SUMMARY, summary)
    return summary


def _targets_source(run: DistillRun) -> str:
    if run.teacher:
        return "online teacher"
    return "cache in RAM" if run.targets.in_memory else "cache streamed"


def _take_folder(
    held: contextlib.ExitStack, out_dir: Path, config: DistillConfig, spec: dict[str, Any], run: RunState
) -> tuple[list[dict[str, Any]], int]:
    """Rank 0's look at the run folder, under its lock (held by `held`): the log so far and the first epoch to run,
    the run's resolved options written (unless the run is finished)."""
    held.enter_context(lock_output(out_dir, folder_lock(out_dir), config.command))
    log_rows, first_epoch = start_or_resume(out_dir, config.resume, spec, run, "distill")
    if not _finished(out_dir, first_epoch, spec["epochs"]):
        write_args(out_dir, config)
    return log_rows, first_epoch


def _finished(out_dir: Path, first_epoch: int, epochs: int) -> bool:
    """Whether the run in `out_dir` ran every epoch and wrote its summary (reused, not recomputed)."""
    return first_epoch > epochs and (out_dir / DISTILL_SUMMARY).is_file()


def _check_processes(config: DistillConfig, world: distributed.World, device) -> None:
    """Every rank takes an equal share of each batch; SyncBatchNorm is CUDA's only (torch)."""
    if config.batch_size % world.size:
        raise UserError(
            f"--batch-size={config.batch_size} is not divisible by the {world.size} processes; each takes an equal "
            "share of every batch"
        )
    if config.sync_batchnorm and world.distributed and device.type != "cuda":
        raise UserError(
            "--sync-batchnorm: torch's SyncBatchNorm runs on CUDA only; on the CPU each process "
            "normalises its own share of the batch"
        )


def _frozen_teacher(
    method: Method, store: FeatureStore, net, config: DistillConfig, num_classes: int, input_size: int
) -> FrozenTeacher | None:
    """The store's teacher, frozen, with both models' stages paired (docs/method.md §6), for a method with a term
    that runs it (Block-KD's stones); None for every other method."""
    if not method.runs_teacher:
        return None
    teacher = store_teacher(store, config.teacher_checkpoint, num_classes, input_size, f"--method={config.method}")
    student_stages, teacher_stages = stage_taps(
        store, teacher, net, config.student, input_size, config.teacher_layers, config.student_layers
    )
    return FrozenTeacher(store.identity.teacher.name, teacher, student_stages, teacher_stages, input_size)


def _views(
    config: DistillConfig, method: Method, store: FeatureStore, part: SplitStore, data: SplitData
) -> tuple[Augmentation | None, int, dict[str, Any] | None]:
    """(the policy of fresh views, the number of cached views drawn from, what the spec records of either: None
    without augmentation). Fresh views (`--augment`) have no cached targets: the method must read no teacher
    output, or have the online teacher compute them."""
    if config.augment is None:
        if config.augment_kwargs:
            raise UserError("--augment-kwargs: there is no --augment policy to configure")
        views = config.views or part.num_views
        if views > part.num_views:
            raise UserError(
                f"--views={views}: {store.path} holds {part.num_views} view{'s' * (part.num_views > 1)} per image "
                "(`kdpipe extract --views K --augment POLICY` caches more)"
            )
        recorded = store.identity.augment
        return None, views, {"source": "cache", **recorded, "views": views} if views > 1 else None
    if config.views is not None:
        raise UserError(f"--views={config.views} and --augment: fresh views replace the cached ones; pass one")
    if method.reads_teacher and not config.online_teacher:
        raise UserError(
            f"--augment={config.augment}: no cache holds the teacher's outputs on fresh views; pass --online-teacher, "
            "or cache views (kdpipe extract --views K --augment POLICY) and train on them"
        )
    try:
        fresh = Augmentation.create(config.augment, config.augment_kwargs, data.preprocessing)
    except UserError as err:
        raise UserError(f"--augment={config.augment}: {err}") from None
    return fresh, 1, {"source": "fresh", **fresh.record(), "seed": config.seed}


def _view_images(
    data: SplitData,
    indices: np.ndarray,
    store: FeatureStore,
    part: SplitStore,
    fresh: Augmentation | None,
    views: int,
    seed: int,
) -> ViewImages:
    """The training images by store row under their views: fresh ones drawn from the run's seed, or the cached
    views replayed from the parameters the store holds (never drawn again)."""
    if fresh is not None:
        return ViewImages(data, fresh, seed, indices)
    if views == 1:
        return ViewImages(data, indices=indices)
    cached = Augmentation.from_record(store.identity.augment)
    stored = {v: part.view(v).read(PARAMS_ARRAY) for v in range(1, views)}
    return ViewImages(data, cached, indices=indices, stored=stored)


def _why_not_cached(store: FeatureStore, path: str) -> str:
    """Why extract left `path` out of the store, where the identity says."""
    identity = store.identity
    if path == LOGITS and identity.teacher.head == "dropped":
        return (
            ": its teacher's weights had a head for another class count, so extract kept a fresh, untrained head and "
            "cached no logits"
        )
    if path == LOGITS and not identity.logits:
        return " (it was extracted with --no-logits)"
    return ""


def _recorded_settings(config: DistillConfig, method: Method, label_budget: bool) -> dict[str, Any]:
    """The config's run settings that can change this run's result: those the method uses, and the choice of
    distilling on unlabelled rows only when there is a label budget to choose it against."""
    ignored = method.ignored_settings() | (set() if label_budget else {"unlabelled_distill"})
    return {k: v for k, v in config.run_settings().items() if k not in ignored}


def _step_budget(num_rows: int, batch_size: int, epochs: int, steps: int | None, subset: bool) -> tuple[int, int, int]:
    """(steps per epoch, total steps, epochs): `steps` when given, the last epoch then cut short; else whole epochs.
    A labelled `subset` smaller than a batch makes epochs of one batch, its rows repeated to fill it
    (`CachedTargets.epoch_order`); a whole split smaller than a batch is an error."""
    steps_per_epoch = num_rows // batch_size
    if steps_per_epoch == 0 and not subset:
        raise UserError(f"--batch-size={batch_size} exceeds the {num_rows} training samples")
    if steps_per_epoch == 0:
        log.info("the %d labelled rows are fewer than a batch of %d: each batch repeats them", num_rows, batch_size)
        steps_per_epoch = 1
    total_steps = steps or epochs * steps_per_epoch
    return steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch)


def _training_rows(
    part: SplitStore, method: Method, config: DistillConfig, classes: list[str]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rows trained on, labelled rows): None means all. Label methods, and every method with
    `unlabelled_distill` off, see only the labelled subset; feature methods otherwise distill on every row."""
    if config.label_fraction >= 1.0:
        return None, None
    try:
        labelled = stratified_subset(part.read(LABELS), config.label_fraction, config.seed, classes)
    except UserError as err:
        raise UserError(f"--label-fraction={config.label_fraction:g}: {err}") from None
    return (labelled if method.uses_labels or not config.unlabelled_distill else None), labelled


def _check_classes(
    data: SplitData, store: FeatureStore, indices: np.ndarray, labelled: np.ndarray | None, label_fraction: float
) -> None:
    """The dataset check on the samples the store caches and on the labelled subset of them."""
    cached = None if len(indices) == len(data) else f"the {len(indices)} samples cached in {store.path}"
    data.check_classes(indices, cached)
    if labelled is not None:
        data.check_classes(indices[labelled], f"--label-fraction={label_fraction:g}")


def _evaluate_classifier(
    net, data: SplitData, data_root: str | None, config: DistillConfig, precision: Precision
) -> dict[str, Any]:
    """Last-epoch top-1 of the student's own classifier on the held-out split, evaluated once."""
    held_out = load_split(data.name, held_out_split(data.name), data_root, preprocessing=data.preprocessing)
    loader = make_loader(held_out, config.batch_size, config.workers, pin_memory=precision.pin_memory)
    return {
        "test_split": held_out.split,
        "test_top1": evaluate_top1(net, loader, precision),
        "num_test": len(held_out),
    }
