"""`kdpipe probe`: freeze the distilled backbone, fit a linear classifier on its pooled features, report top-1.

A feature-only backbone never saw a label; this is the only place labels are used for it, and with
`--label-fraction` only the run's labelled subset is. Features are taken at the
last distilled tap (or `--tap`), globally average-pooled (tokens: mean over all tokens, class token included) and
standardised with train statistics. The head is fitted full-batch with L-BFGS on cross entropy plus L2; its weight
decay is chosen on a stratified held-out part of the train split, never on the test split, which is evaluated once.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from cache.errors import StoreError
from cache.location import location
from cache.lock import lock_output
from cache.store import FeatureStore

from ..config import ProbeConfig
from ..data.datasets import Preprocessing, SplitData, held_out_split, load_split, stratified_subset
from ..distillation.run_spec import RunSpec
from ..engine.checkpoints import file_or_bytes, load_checkpoint, read_model_spec, save_checkpoint
from ..engine.precision import Precision
from ..engine.provenance import load_matching_split, recorded_data_root
from ..engine.recipe import make_loader
from ..engine.runtime import progress, resolve_device, seed_everything, write_args, write_json
from ..errors import UserError
from ..layout import CLASSIFIER, LABELLED_INDICES, PROBE_SUMMARY, STUDENT_WEIGHTS, folder_lock
from ..models.spec import ModelSpec, ProbeHead
from ..models.taps import STEM, Tap, TapRecorder, list_taps, pool_embedding, stage_ends
from ..models.zoo import create_model

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
FALLBACK_WEIGHT_DECAY = 1e-3
VALIDATION_FRACTION = 0.2
# Below this the embedding is constant up to float32 rounding (a real one varies by tens of percent of its size).
NEGLIGIBLE_SPREAD = 1e-4


class LinearProbeClassifier(nn.Module):
    """Backbone up to `tap`, global average pooling by the tap's `layout`, one linear layer (standardisation
    folded into it)."""

    def __init__(self, backbone: nn.Module, tap: str, layout: str, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.tap, self.layout, self.head = backbone, tap, layout, head
        self._recorder = TapRecorder(backbone, [tap], stop_after_last=True).attach()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return pool_embedding(self._recorder.run(images)[self.tap], self.layout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def load_classifier(path: str | Path) -> LinearProbeClassifier:
    """The exported classifier in eval mode; `.transform` preprocesses a PIL image or uint8 tensor for it."""
    path = location(path)
    path = path / CLASSIFIER if path.is_dir() else path
    spec = read_model_spec(path)
    if not spec or spec.head is None:
        raise UserError(f"{path} is not a kdpipe classifier")
    backbone = create_model(spec.model, spec.num_classes, input_size=spec.input_size, model_kwargs=spec.model_kwargs)
    head = nn.Linear(spec.head.embedding_dim, spec.num_classes)
    classifier = LinearProbeClassifier(backbone, spec.head.tap, spec.head.tap_layout, head)
    load_checkpoint(classifier, path)
    classifier.transform = Preprocessing.from_dict(spec.preprocessing).transform()
    classifier.classes = spec.head.classes
    return classifier.eval()


def probe(config: ProbeConfig) -> dict[str, Any]:
    """Fits and evaluates the linear probe of the student in `config.run`, under the run folder's lock; writes
    probe.json and the classifier."""
    run_dir = location(config.run)
    if not (run_dir / STUDENT_WEIGHTS).is_file():
        raise UserError(f"{run_dir} holds no distilled student ({STUDENT_WEIGHTS}); run kdpipe distill first")
    with lock_output(run_dir, folder_lock(run_dir), config.command):
        return _probe(config, run_dir)


def _probe(config: ProbeConfig, run_dir: Path) -> dict[str, Any]:
    spec = read_model_spec(run_dir / STUDENT_WEIGHTS)
    if not spec or spec.run is None:
        raise UserError(f"{run_dir / STUDENT_WEIGHTS} is not a distilled kdpipe student; run kdpipe distill first")
    run = RunSpec.from_json(spec.run)
    dev = resolve_device(config.device)
    seed, max_iter = config.seed, config.max_iter
    seed_everything(seed)
    backbone = create_model(spec.model, spec.num_classes, input_size=spec.input_size, model_kwargs=spec.model_kwargs)
    load_checkpoint(backbone, run_dir / STUDENT_WEIGHTS)
    tap = list_taps(backbone, spec.input_size, names=[config.tap or _default_tap(backbone, spec, run)])[0]
    train, test = _probe_data(
        spec, run, recorded_data_root(config.data_root, spec.data_root, run_dir), config.fingerprint
    )
    # Only the labelled subset of a --label-fraction run trains the head (the whole train split otherwise).
    labelled = _labelled_indices(run_dir, run, len(train))
    train.check_classes(labelled, None if len(labelled) == len(train) else f"the {len(labelled)} labelled samples")
    write_args(run_dir, config)
    backbone.to(dev).eval()
    x_train = _embed(backbone, tap, Subset(train, labelled.tolist()), "train", config, dev)
    x_test = _embed(backbone, tap, test, test.split, config, dev)
    y_train, y_test = torch.from_numpy(train.labels[labelled]), torch.from_numpy(test.labels)
    _warn_if_constant(x_train, tap.name)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    z_train, z_test = (x_train - mean) / std, (x_test - mean) / std
    val_scores = _choose_weight_decay(z_train, y_train, train.classes, max_iter, seed)
    # Ties go to the stronger regularisation; with too few labels to hold any out, the middle of the grid.
    weight_decay = max(val_scores, key=lambda wd: (val_scores[wd], wd)) if val_scores else FALLBACK_WEIGHT_DECAY
    head = fit_linear(z_train, y_train, train.num_classes, weight_decay, max_iter)
    test_top1 = _top1(head(z_test), y_test)
    train_top1 = _top1(head(z_train), y_train)
    folded = _fold_standardisation(head, mean, std)
    classifier = LinearProbeClassifier(backbone.cpu(), tap.name, tap.layout, folded)
    head_spec = ProbeHead(tap.name, tap.layout, int(x_train.shape[1]), train.classes)
    export_spec = replace(spec, preprocessing=train.preprocessing.to_dict(), head=head_spec)
    save_checkpoint(classifier, run_dir / CLASSIFIER, export_spec)
    summary = {
        "stage": "probe",
        "run": str(run_dir),
        "model": spec.model,
        "tap": tap.name,
        "tap_layout": tap.layout,
        "embedding_dim": int(x_train.shape[1]),
        "test_split": test.split,
        "test_top1": test_top1,
        "train_top1": train_top1,
        "weight_decay": weight_decay,
        "max_iter": max_iter,
        "validation_top1_by_weight_decay": {str(k): v for k, v in val_scores.items()},
        "num_train": len(labelled),
        "num_test": len(test),
        "seed": seed,
        "classifier": str(run_dir / CLASSIFIER),
    }
    write_json(run_dir / PROBE_SUMMARY, summary)
    return summary


def _labelled_indices(run_dir: Path, run: RunSpec, num_train: int) -> np.ndarray:
    """Dataset indices of the train images the run may use labels of: those its distill run recorded."""
    path = run_dir / LABELLED_INDICES
    if path.is_file():
        return np.load(file_or_bytes(path))
    if run.settings.get("label_fraction", 1.0) < 1.0:
        raise UserError(f"{path} is missing, so the labelled subset of this --label-fraction run is unknown")
    return np.arange(num_train)  # runs from before the file existed: the whole train split


def _probe_data(spec: ModelSpec, run: RunSpec, data_root: str | None, fingerprint: str) -> tuple[SplitData, SplitData]:
    """Train split checked against the store the student was distilled from (when it is still there), else served
    with the preprocessing the run recorded; the test split served as the train split."""
    try:
        store = FeatureStore.open(run.store)
    except StoreError:
        store = None
    if store is not None and store.provenance.config_hash == run.store_config_hash:
        train = load_matching_split(store, "train", spec.dataset, data_root, fingerprint=fingerprint)
    else:  # runs distilled before the preprocessing was recorded: the dataset's own
        preprocessing = Preprocessing.from_dict(spec.preprocessing) if spec.preprocessing else None
        train = load_split(spec.dataset, "train", data_root, spec.input_size, preprocessing=preprocessing)
    test = load_split(spec.dataset, held_out_split(spec.dataset), data_root, preprocessing=train.preprocessing)
    return train, test


def _default_tap(backbone: nn.Module, spec: ModelSpec, run: RunSpec) -> str:
    """The last distilled tap; a student trained without feature loss is probed at its last stage end."""
    if run.student_taps:
        return run.student_taps[-1]
    taps = list_taps(backbone, spec.input_size)
    return (stage_ends(taps) or [t for t in taps if t.role != STEM])[-1].name


@torch.no_grad()
def _embed(backbone: nn.Module, tap: Tap, data: Dataset, name: str, config: ProbeConfig, dev) -> torch.Tensor:
    chunks = []
    precision = Precision(dev)  # float32 features for the head; on CUDA, pinned batches copied without waiting
    loader = make_loader(data, config.batch_size, config.workers, pin_memory=precision.pin_memory)
    with TapRecorder(backbone, [tap.name], stop_after_last=True) as recorder:
        for images, _ in progress(loader, desc=f"embed {name}", leave=False):
            features = recorder.run(precision.batch(images))[tap.name]
            chunks.append(pool_embedding(features, tap.layout).float().cpu())
    return torch.cat(chunks)


def relative_spread(embeddings: torch.Tensor) -> float:
    """How much the (N, D) embeddings vary across images against their size: the RMS over features of the standard
    deviation across images, over the RMS of all values; 0 for constant (or all-zero) embeddings."""
    x = embeddings.double()
    size = x.pow(2).mean().sqrt().item()
    return x.std(0).pow(2).mean().sqrt().item() / size if size > 0 else 0.0


def _warn_if_constant(embeddings: torch.Tensor, tap: str) -> None:
    """A student whose eval-mode features do not depend on the image gets a chance-level probe; say so, as the
    accuracy alone does not say why."""
    spread = relative_spread(embeddings)
    if spread < NEGLIGIBLE_SPREAD:
        log.warning(
            "embedding at %s barely varies across images (relative spread %.1g): the probe can only reach chance",
            tap,
            spread,
        )


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int) -> nn.Linear:
    """Multinomial logistic regression, full batch: L-BFGS on CE + (weight_decay / 2)·|W|², from zeros."""
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head.requires_grad_(False)


def _choose_weight_decay(x: torch.Tensor, y: torch.Tensor, classes: list[str], max_iter: int, seed: int):
    """Validation top-1 per weight decay, on a seeded stratified 20 % of the (labelled) train images; empty when
    there are too few of them to hold out every class."""
    try:
        fit_idx = stratified_subset(y.numpy(), 1.0 - VALIDATION_FRACTION, seed)
    except UserError:
        return _no_validation(y.numpy(), classes)
    val_idx = np.setdiff1d(np.arange(len(y)), fit_idx)
    if len(np.unique(y.numpy()[val_idx])) < len(np.unique(y.numpy())):
        return _no_validation(y.numpy(), classes)
    fit_idx, val_idx = torch.from_numpy(fit_idx), torch.from_numpy(val_idx)
    return {
        wd: _top1(fit_linear(x[fit_idx], y[fit_idx], len(classes), wd, max_iter)(x[val_idx]), y[val_idx])
        for wd in WEIGHT_DECAYS
    }


def _no_validation(labels: np.ndarray, classes: list[str]) -> dict:
    """No validation scores (the weight decay falls back), with a warning naming the smallest class."""
    counts = np.bincount(labels, minlength=len(classes))
    smallest = min(np.flatnonzero(counts), key=lambda c: counts[c])
    log.warning(
        "too few labelled samples to hold out every class for choosing the weight decay (class %r has %d): fixed at %g",
        *(classes[smallest], counts[smallest], FALLBACK_WEIGHT_DECAY),
    )
    return {}


def _fold_standardisation(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """W((x - m) / s) + b  ==  (W / s) x + (b - (W / s) m): the exported head takes raw pooled features."""
    folded = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - folded.weight @ mean)
    return folded


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent correct, from the integer count: exact in float64 (a float32 mean turns 27 of 30 into 89.9999976)."""
    return 100 * int((logits.argmax(1) == labels).sum()) / len(labels)
