"""`kdpipe verify --recompute N`: the live teacher against a sample of the cached targets, in every view.

For each split and view, N seeded rows are replayed from the store alone (the view's stored parameters, the recorded
preprocessing and augmentation, the teacher as recorded and checked against its sha256) and run through the teacher
at the store's recorded precision (`--amp`); each tap's and the logits' cosine similarity to the cached values, per
sample, must reach MIN_COSINE. It checks what checksums cannot: that a cached view holds the teacher's outputs on
exactly the pixels distill will show the student.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import cosine_similarity

from cache.schema import INDICES, LOGITS, PARAMS_ARRAY, feature_path
from cache.store import FeatureStore, SplitStore

from ..data.augment import Augmentation, ViewImages
from ..engine.precision import Precision
from ..engine.provenance import load_matching_split, recorded_data_root
from ..engine.runtime import progress, resolve_device
from ..engine.training import store_teacher
from ..models.taps import TapRecorder

log = logging.getLogger(__name__)
MIN_COSINE = 0.999  # float16 storage alone keeps cosines above 0.99999 on the built-in teachers


@dataclass(frozen=True)
class Agreement:
    """How closely the cached values of one (split, view, array) follow the live teacher on `rows` sampled rows."""

    split: str
    view: int
    array: str
    rows: int
    min_cosine: float
    mean_cosine: float

    @property
    def agrees(self) -> bool:
        return self.min_cosine >= MIN_COSINE


def recompute(
    path: str,
    rows_per_view: int,
    checkpoint: str | None = None,
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    seed: int = 0,
) -> list[Agreement]:
    """The agreement of every cached array of every view of every complete split with the live teacher."""
    store = FeatureStore.open(path)
    identity = store.identity
    num_classes, input_size = identity.dataset.num_classes, identity.dataset.input_size
    # the teacher runs at the precision the store was extracted with, as it ran then
    amp = identity.amp
    refused_as = f"--recompute ({store.path} was extracted with --amp={amp})"
    precision = Precision(resolve_device(device), amp, refused_as=refused_as)
    teacher = precision.model(store_teacher(store, checkpoint, num_classes, input_size, "--recompute")).eval()
    augmentation = Augmentation.from_record(identity.augment) if identity.augment else None
    root = recorded_data_root(data_root, store.provenance.data_root, store.path)
    found = []
    for part in store.splits():
        if not part.complete:
            log.warning("split %s is not complete: not recomputed", part.name)
            continue
        data = load_matching_split(store, part.name, None, root)
        rows = np.sort(np.random.default_rng(seed).permutation(part.num_samples)[:rows_per_view])
        indices = part.read(INDICES)
        for view, view_part in enumerate(part.views()):
            stored = {view: view_part.read(PARAMS_ARRAY)} if view else {}
            images = ViewImages(data, augmentation, indices=indices, stored=stored)
            found += _agreement(teacher, images, view_part, view, rows, batch_size, precision)
    return found


@torch.no_grad()
def _agreement(
    teacher: torch.nn.Module,
    images: ViewImages,
    part: SplitStore,
    view: int,
    rows: np.ndarray,
    batch_size: int,
    precision: Precision,
) -> list[Agreement]:
    taps = part.tap_names
    arrays = [feature_path(t) for t in taps] + ([LOGITS] if LOGITS in part.array_names else [])
    cosines: dict[str, list[torch.Tensor]] = {a: [] for a in arrays}
    split = part.name.split("/")[0]
    with TapRecorder(teacher, taps, stop_after_last=LOGITS not in arrays) as recorder:
        for start in progress(range(0, len(rows), batch_size), desc=f"recompute {part.name}", leave=False):
            batch = rows[start : start + batch_size]
            pixels = torch.stack([image for image, *_ in images.__getitems__([(int(r), view) for r in batch])])
            with precision.autocast():
                live = recorder.run(precision.batch(pixels))
            live = {feature_path(t): v for t, v in live.items()} | (
                {LOGITS: recorder.logits} if LOGITS in arrays else {}
            )
            for array in arrays:
                cached = torch.from_numpy(part.read(array, batch).astype(np.float32))
                cosines[array].append(_cosine(live[array].float().cpu(), cached))
    return [
        Agreement(split, view, a, len(rows), float(torch.cat(c).min()), float(torch.cat(c).mean()))
        for a, c in cosines.items()
    ]


def _cosine(live: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of the flattened values; 1 where both are zero (a dead ReLU map agrees with itself)."""
    live, cached = live.flatten(1), cached.flatten(1)
    both_zero = (live.norm(dim=1) == 0) & (cached.norm(dim=1) == 0)
    return torch.where(both_zero, torch.ones(len(live)), cosine_similarity(live, cached, dim=1, eps=1e-12))
