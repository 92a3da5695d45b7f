"""The distillation training loop: images paired with cached targets by store row, one optimizer step per batch.

Per epoch the cached targets decide the sample order (`cache.reader.CachedTargets`), the matching images are
loaded by row, the method returns its named losses and AdamW + OneCycle step once per batch. The order of epoch e
depends only on (seed, e), so a resumed run reproduces the uninterrupted one exactly.

Under torchrun the order is the same, whatever the number of processes: every global batch of the epoch is cut into
one contiguous share per rank, each rank loads its share's images and reads the targets' whole chunks, and DDP
averages the ranks' gradients, so N processes take the steps one process takes (up to float summation order, and
BatchNorm statistics over each share unless --sync-batchnorm). Every rank gets one share of every batch: the same
number of batches, none padded with repeated samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache.reader import CachedTargets
from cache.schema import LOGITS, feature_path
from cache.store import FeatureStore

from ..data.augment import ViewImages
from ..distillation.losses import STORE_ROWS
from ..distillation.methods import Distiller
from ..errors import UserError
from ..models.taps import TapRecorder
from ..models.zoo import load_teacher
from .distributed import World
from .precision import Precision
from .provenance import recorded_checkpoint
from .recipe import make_loader
from .runtime import progress

log = logging.getLogger(__name__)
VIEW_STREAM = 1  # the epoch's view draws use their own generator, so a run without views keeps its sample order


class OnlineTeacher:
    """The teacher run on every batch (eval, no grad) instead of reading the cache: same taps, same loss; its
    logits too when `logits` (the method reads them).

    For fresh targets (fresh augmentation every epoch), and the baseline the cache is measured against.
    """

    def __init__(self, model: torch.nn.Module, taps: list[str], logits: bool = False) -> None:
        self.model, self.taps, self.logits = model.eval(), taps, logits
        self._recorder = TapRecorder(model, taps, stop_after_last=not logits).attach()

    @classmethod
    def from_store(
        cls,
        store: FeatureStore,
        taps: list[str],
        checkpoint: str | None,
        num_classes: int,
        input_size: int,
        logits: bool = False,
    ) -> OnlineTeacher:
        return cls(store_teacher(store, checkpoint, num_classes, input_size, "--online-teacher"), taps, logits)

    @property
    def paths(self) -> list[str]:
        """The cached arrays (store paths) it stands in for."""
        return [feature_path(t) for t in self.taps] + ([LOGITS] if self.logits else [])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self._recorder.run(images)
        outputs = [features[t] for t in self.taps] + ([self._recorder.logits.float()] if self.logits else [])
        return dict(zip(self.paths, outputs, strict=True))


def store_teacher(
    store: FeatureStore, checkpoint: str | None, num_classes: int, input_size: int, purpose: str
) -> torch.nn.Module:
    """Rebuilds the store's teacher as recorded (model kwargs, checkpoint entry) for `purpose` (an option named in
    errors); its weights must be the ones the store was extracted with (the recorded sha256): `checkpoint`, else
    found where the store records them (`provenance.recorded_checkpoint`)."""
    teacher = store.identity.teacher
    checkpoint = recorded_checkpoint(store, checkpoint, purpose)
    try:
        # building the teacher (on the CPU) must not move the student's random stream
        with torch.random.fork_rng(devices=[]):
            model, _ = load_teacher(
                teacher.name,
                checkpoint,
                teacher.pretrained,
                teacher.model_kwargs or None,
                num_classes,
                input_size,
                teacher.checkpoint_key,
            )
    except UserError as err:
        raise UserError(f"{purpose}: cannot rebuild teacher {teacher.name!r} of {store.path}: {err}") from err
    return model


@dataclass
class Trainer:
    """What every epoch of one run shares: the distiller and its optimizer, where targets and images come from."""

    distiller: Distiller
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    targets: CachedTargets
    images: ViewImages
    teacher: OnlineTeacher | None
    batch_size: int
    seed: int
    precision: Precision  # the device, and how the forward and backward passes run on it
    workers: int = 0
    fresh_views: bool = False  # every epoch a view never cached (`--augment`): epoch e shows each image's view e
    world: World = World()
    model: torch.nn.Module | None = None  # what runs the distiller's step: DDP's wrapper of it, or itself

    def __post_init__(self) -> None:
        self.model = self.model or self.distiller

    def epoch_plan(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray] | None, np.ndarray]:
        """Epoch `epoch`'s row windows, the cached view of each row (None with fresh views, whose targets come from
        the online teacher), and the (row, view) keys of its images in order: a function of (seed, epoch) alone."""
        windows = self.targets.epoch_order(np.random.default_rng([self.seed, epoch]), at_least=self.batch_size)
        order = np.concatenate(windows)
        if self.fresh_views:
            return windows, None, np.stack([order, np.full(len(order), epoch)], 1)
        if self.targets.num_views == 1:
            return windows, None, np.stack([order, np.zeros(len(order), dtype=order.dtype)], 1)
        views = self.targets.view_draws(windows, np.random.default_rng([self.seed, epoch, VIEW_STREAM]))
        return windows, views, np.stack([order, np.concatenate(views)], 1)

    def run_epoch(self, epoch: int, epochs: int, num_batches: int) -> dict[str, Any]:
        """Trains `num_batches` batches of epoch `epoch` (of `epochs`); returns its log row (mean losses, LR, speed)."""
        self.distiller.train()
        windows, views, keys = self.epoch_plan(epoch)
        global_batches = keys[: num_batches * self.batch_size].reshape(-1, self.batch_size, 2)
        key_batches = [self.world.share(batch).tolist() for batch in global_batches]
        loader = make_loader(
            self.images, workers=self.workers, batch_sampler=key_batches, pin_memory=self.precision.pin_memory
        )
        sums: dict[str, float] = {}
        start, seen = time.perf_counter(), 0
        targets = self.targets.batches(windows, self.batch_size, views)
        batches = zip(key_batches, loader, targets, strict=False)  # targets run longer
        bar = progress(batches, total=len(key_batches), desc=f"distill {epoch}/{epochs}", unit="batch", leave=False)
        for key_batch, (images, _, rows, _), global_targets in bar:
            target_rows, target_views, target_values = self._share(*global_targets)
            keys_served = np.asarray(key_batch)
            if not np.array_equal(rows.numpy(), target_rows) or (
                views is not None and not np.array_equal(keys_served[:, 1], target_views)
            ):
                raise RuntimeError("images and cached targets went out of step")
            losses = self._step(self.precision.batch(images), rows, target_values, epoch)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value * len(rows)
            seen += len(rows)
            bar.set_postfix(loss=f"{sum(losses.values()):.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
        seconds = time.perf_counter() - start
        *totals, seen = self.world.all_sum([*sums.values(), seen])  # the epoch's means over every rank's share
        row = {
            "epoch": epoch,
            **{k: v / seen for k, v in zip(sums, totals, strict=True)},
            "lr": self.schedule.get_last_lr()[0],
            "seconds": round(seconds, 3),
            "images_per_second": round(seen / seconds, 1),
        }
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs:  # about ten lines per run, however short its epochs
            log.info("epoch %d: %s", epoch, "  ".join(f"{k} {row[k]:.5f}" for k in sums))
        return row

    def _share(
        self, rows: np.ndarray, views: np.ndarray, values: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """This rank's share of a global batch of targets."""
        return self.world.share(rows), self.world.share(views), [self.world.share(v) for v in values]

    def _step(
        self, images: torch.Tensor, rows: torch.Tensor, target_values: list[np.ndarray], epoch: int
    ) -> dict[str, float]:
        """One optimizer step on the images of store rows `rows`; returns the batch's losses."""
        paths, device = self.targets.paths, self.precision.device
        batch = {path: torch.from_numpy(v).to(device) for path, v in zip(paths, target_values, strict=True)}
        if STORE_ROWS in self.distiller.method.inputs:
            batch[STORE_ROWS] = rows.to(device)
        with self.precision.autocast():
            if self.teacher:
                batch.update(self.teacher(images))
            _, losses = self.model(images, batch)
            loss = sum(losses.values())
        optimizer_step(loss, epoch, self.optimizer, self.schedule, self.precision)
        return {name: value.item() for name, value in losses.items()}


def optimizer_step(
    loss: torch.Tensor,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
) -> None:
    """One step of teach's and distill's recipe on `loss` (the gradient scaled under fp16), then the schedule's.
    A diverging run stops at its first non-finite loss (`checkpoints.resumable` says which checkpoint is kept)."""
    if not torch.isfinite(loss):
        raise UserError(f"the loss is not finite at epoch {epoch}")
    precision.step(loss, optimizer)
    schedule.step()
