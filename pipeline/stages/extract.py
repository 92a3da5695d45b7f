"""`kdpipe extract`: run the teacher once (eval, no grad) and cache its tap features, labels and logits.

The store's identity is a hash of everything that determines its contents (teacher, weights, data, preprocessing,
taps, subset); re-running on an incomplete store with the same identity resumes at the missing blocks (and writes
a missing or damaged split again), on a complete one it does nothing, and on a different or unreadable one it
refuses unless told to overwrite. Everything from the first look at the store on runs under the store's lock, and
nothing is written before the raw size of what remains to write is checked against the free space.

Under torchrun (`pipeline.engine.distributed`) rank 0 holds the lock, creates or resumes the store and its splits, and
fixes the plan: the blocks each view still misses. Every rank then computes and writes its own share of those
blocks (whole blocks, so whole chunks: no two ranks ever write one chunk, and only rank 0 writes metadata) and
flags each block done after its chunks; after a barrier every rank checks that no block is missing and rank 0
marks the store complete. A block is computed from its rows alone, so the store is the same, byte for byte,
whatever the number of processes, and an interrupted run resumes with any number.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cache.errors import DamagedStoreError, StoreError
from cache.location import is_remote, location
from cache.lock import lock_output, store_lock
from cache.records import DatasetRecord, StoreIdentity, TeacherRecord
from cache.schema import INDICES, LABELS, LOGITS, PARAMS_ARRAY, PICKED_BY, feature_path, view_path
from cache.store import ArraySpec, FeatureStore, SplitStore, compressors
from cache.writer import SplitWriter

from ..config import ExtractConfig
from ..data.augment import PARAMS, POLICIES, Augmentation, ViewImages
from ..data.datasets import Preprocessing, SplitData, held_out_split, load_split, stratified_subset
from ..distillation.picks import check_teacher, expand_layers
from ..engine import distributed
from ..engine.checkpoints import file_sha256, read_model_spec
from ..engine.precision import Precision
from ..engine.provenance import absolute_root, checkpoint_places
from ..engine.recipe import make_loader
from ..engine.runtime import first_difference, progress, resolve_device, seed_everything, short, write_args, write_json
from ..errors import UserError, writing
from ..layout import EXTRACT_SUMMARY, STORE_NAME, derived_files
from ..models.taps import Tap, TapRecorder, list_taps, stage_ends
from ..models.zoo import TeacherBuild, load_teacher, served_preprocessing
from ..version import __version__

log = logging.getLogger(__name__)

FEATURE_DTYPE = "float16"
QUEUE_BATCHES = 8  # batches the writer may lag behind the teacher


def extract(config: ExtractConfig) -> dict[str, Any]:
    """Extracts every requested split into `out/features.zarr` and writes `out/extract.json`; returns that summary."""
    world = distributed.current()
    dev = world.device(resolve_device(config.device))
    compressors(config.compression)  # a bad codec string fails before anything is written
    if not config.splits:
        raise UserError("--splits names no split")
    seed_everything(config.seed)
    data = {
        split: load_split(config.dataset, split, config.data_root, config.input_size, config.download)
        for split in config.splits
    }
    rows = {split: _select_rows(d, config.max_samples, config.seed) for split, d in data.items()}
    fingerprints = {split: d.fingerprint_record(config.fingerprint) for split, d in data.items()}
    first = data[config.splits[0]]
    input_size, num_classes = first.preprocessing.input_size, first.num_classes
    model, built = load_teacher(
        config.teacher,
        config.checkpoint,
        config.pretrained,
        config.model_kwargs,
        num_classes,
        input_size,
        config.checkpoint_key,
    )
    precision = Precision.of(config, dev)
    precision.model(model).eval()
    logits = config.logits and not built.head_dropped
    if config.logits and not logits:
        log.info("the teacher's head was dropped, so its logits mean nothing: caching no logits")
    # The whole model's taps, for its stage ends; cached logits must be (batch, num_classes).
    layers = list_taps(model, input_size, num_classes=num_classes if logits else None)
    names, picks = expand_layers(config.layers, layers)
    teacher = _teacher_record(config, built, layers)
    if picks:  # before the names are looked up: another teacher's picks name taps this one may not have
        check_teacher(picks, teacher)
    taps = list_taps(model, input_size, names=names) if names else layers
    preprocessing = served_preprocessing(config.teacher, model, first.preprocessing, config.normalization)
    _warn_if_trained_otherwise(config.checkpoint, config.pretrained, model, preprocessing)
    data = {split: d.with_preprocessing(preprocessing) for split, d in data.items()}
    augmentation = _augmentation(config, preprocessing)
    views = {split: config.views if split != held_out_split(config.dataset) else 1 for split in data}
    identity = StoreIdentity(
        teacher,
        DatasetRecord(
            config.dataset,
            num_classes,
            first.classes,
            preprocessing.to_dict(),
            {s: {**fingerprints[s], "size": len(d)} for s, d in data.items()},
        ),
        [t.record() for t in taps],
        FEATURE_DTYPE,
        logits,
        config.max_samples,
        config.seed if config.max_samples else None,
        precision.amp,
        {**augmentation.record(), "views": config.views, "seed": config.seed} if augmentation else None,
    )
    out = location(config.out)
    specs, view_specs = _array_specs(taps, logits, num_classes), _view_specs(taps, logits, num_classes)
    # Where the teacher's weights and the data were read from: beside the identity, not in it (the same data and
    # weights may live anywhere); distill and probe find the data there by default.
    places = {**checkpoint_places(config.checkpoint, out), "data_root": absolute_root(config.data_root)}
    if picks:  # the scores that chose the taps (`pipeline.distillation.picks`)
        places[PICKED_BY] = picks.to_json()
    path = out / STORE_NAME
    layout = (specs, view_specs, [t.name for t in taps])
    # zarr's own writes, refused by a full or read-only disk, name the store
    with contextlib.ExitStack() as held, writing(path):
        plan = world.from_main(
            lambda: _prepare(held, path, identity, places, config, layout, data, rows, views, fingerprints)
        )
        store = FeatureStore.open(path, mode="r+")
        if plan is None:
            log.info("%s is already complete; nothing to do", store.path)
            return world.from_main(lambda: _summary(store, {}, out))
        timings = {}
        for split, missing in plan.items():
            images = ViewImages(data[split], augmentation, config.seed, indices=rows[split])
            part = store.split(split)
            timings[split] = _extract_split(model, images, part, missing, taps, logits, config, precision, world)
        world.barrier()
        for split in plan:  # every rank checks that all the blocks are written, rank 0 says so
            store.split(split).check_written()
        world.from_main(lambda: _mark_complete(store, list(plan)))
        timings = _combined(world.gather(timings))
        return world.from_main(lambda: _summary(store, timings, out))


def _mark_complete(store: FeatureStore, splits: list[str]) -> None:
    for split in splits:
        store.split(split).mark_complete()
    store.mark_complete()


def _prepare(
    held: contextlib.ExitStack,
    path: Path,
    identity: StoreIdentity,
    places: dict[str, Any],
    config: ExtractConfig,
    layout: tuple[list[ArraySpec], list[ArraySpec], list[str]],
    data: dict[str, SplitData],
    rows: dict[str, np.ndarray],
    views: dict[str, int],
    fingerprints: dict[str, dict[str, Any]],
) -> dict[str, list[list[int]]] | None:
    """Rank 0's part before any feature is computed: takes the store's lock (held by `held`), resumes or creates
    the store and creates every split not intact; returns the plan, each split's missing blocks per view (None:
    the store is complete). The plan is fixed before any rank writes, so every rank shares the same one."""
    specs, view_specs, tap_names = layout
    held.enter_context(lock_output(path, store_lock(path), config.command))
    store, intact = _resume_or_create(path, identity, places, config, (specs, view_specs), rows, views)
    write_args(path.parent, config)
    if store.complete:
        return None
    plan = {}
    for split, d in data.items():
        if intact.get(split):
            part = store.split(split)
        else:
            attrs = {"split": split, "dataset_size": len(d), **fingerprints[split]}
            store.remove_split(split)  # what is left of it: a creation interrupted, damaged metadata
            part = store.create_split(
                split, len(rows[split]), specs, tap_names, attrs, config.compression, view_specs, views[split]
            )
        plan[split] = [view.missing_blocks() for view in part.views()]
    return plan


def _teacher_record(config: ExtractConfig, built: TeacherBuild, layers: list[Tap]) -> TeacherRecord:
    """The store identity's teacher: the model, the weights it ran with, and its stage ends among `layers`."""
    return TeacherRecord(
        config.teacher,
        file_sha256(config.checkpoint) if config.checkpoint else None,
        config.pretrained,
        built.model_kwargs,
        built.checkpoint_key,
        built.head,
        [t.name for t in stage_ends(layers)],
    )


def _warn_if_trained_otherwise(
    checkpoint: str | None, pretrained: bool, model: nn.Module, preprocessing: Preprocessing
) -> None:
    """A kdpipe teacher records the preprocessing it was trained with, pretrained timm weights their input size;
    extracting with another is allowed, not quiet."""
    spec = read_model_spec(checkpoint) if checkpoint else None
    trained = spec.preprocessing if spec else None
    used = preprocessing.to_dict()
    if trained and trained != used:
        log.warning("%s was trained with preprocessing %s; extracting with %s", checkpoint, trained, used)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") if pretrained else None
    if size and size[-1] != preprocessing.input_size:
        log.warning(
            "the pretrained weights were trained at %d px; extracting at %d px", size[-1], preprocessing.input_size
        )


def _augmentation(config: ExtractConfig, preprocessing: Preprocessing) -> Augmentation | None:
    """The policy views 1..K-1 are drawn from; both or neither of --views K > 1 and --augment are given."""
    if config.augment is None and config.views > 1:
        raise UserError(
            f"--views={config.views}: views 1..{config.views - 1} need --augment=POLICY ({', '.join(POLICIES.names())})"
        )
    if config.augment is None:
        if config.augment_kwargs:
            raise UserError("--augment-kwargs: there is no --augment policy to configure")
        return None
    if config.views == 1:
        raise UserError(f"--augment={config.augment}: --views=1 is the plain image alone; pass --views=K (K >= 2)")
    try:
        return Augmentation.create(config.augment, config.augment_kwargs, preprocessing)
    except UserError as err:
        raise UserError(f"--augment={config.augment}: {err}") from None


def _select_rows(data: SplitData, max_samples: int | None, seed: int) -> np.ndarray:
    """Dataset indices to cache: all of them, or a seeded class-stratified subset, in ascending order; either must
    pass the dataset check."""
    data.check_classes()
    if max_samples is None or max_samples >= len(data):
        return np.arange(len(data))
    if max_samples < data.num_classes:
        raise UserError(f"--max-samples={max_samples} is below the number of classes ({data.num_classes})")
    try:
        rows = stratified_subset(data.labels, max_samples, seed, data.classes)
    except UserError as err:
        raise UserError(f"--max-samples={max_samples}: {err}") from None
    data.check_classes(rows, f"--max-samples={max_samples}")
    return rows


def _resume_or_create(
    path: Path,
    identity: StoreIdentity,
    places: dict[str, Any],
    config: ExtractConfig,
    specs: tuple[list[ArraySpec], list[ArraySpec]],
    rows: dict[str, np.ndarray],
    views: dict[str, int],
) -> tuple[FeatureStore, dict[str, bool]]:
    """The store to write into and which of its splits are intact: the store at `path` when it has this identity,
    else a new one, created once the size check passed. A complete store with a split missing or damaged is marked
    incomplete, and that split is written again. A resumed store's recorded `places` are updated to the ones given."""
    store = _resumable(path, identity, config.overwrite)
    moved = {k: v for k, v in places.items() if v is not None and store and store.meta.get(k) != v}
    if moved:
        store.update_meta(**moved)
    intact = {split: _intact(store, split) for split in rows} if store else {}
    if store is not None and store.complete and all(intact.values()):
        return store, intact
    _check_size(
        path, specs, rows, views, {split: store.split(split) for split, ok in intact.items() if ok}, config.max_store_gb
    )
    if store is None:
        return _create(path, identity, places, config.overwrite), {}
    if store.complete:
        damaged = ", ".join(split for split, ok in intact.items() if not ok)
        log.warning("%s is marked complete, but split %s is missing or damaged: writing it again", path, damaged)
        store.update_meta(complete=False)
    return store, intact


def _resumable(path: Path, identity: StoreIdentity, overwrite: bool) -> FeatureStore | None:
    """The store at `path` when it has this identity (resumed, even with --overwrite); None when there is none or
    --overwrite replaces it. A different or unreadable store is refused without --overwrite."""
    if not path.exists():
        return None
    try:
        store = FeatureStore.open(path, mode="r+")
    except StoreError as err:
        if overwrite:
            return None
        hint = "" if isinstance(err, DamagedStoreError) else "; choose another --out, or pass --overwrite to replace it"
        raise UserError(f"{err}{hint}") from err
    if store.provenance.config_hash == identity.config_hash:
        if discarded := store.discard_unfinished_writes():
            log.info("%s: removed %d unfinished chunk writes a killed run left", path, discarded)
        return store
    if not overwrite:
        where, was, now = first_difference(store.meta.get("identity", {}), identity.to_json())
        field = f"{where} ({short(was)} vs {short(now)})" if where else "format"
        raise UserError(f"{path} holds a different store ({field} differs); use another --out or pass --overwrite")
    return None


def _intact(store: FeatureStore, split: str) -> bool:
    """Whether the split is in the store, its creation finished and all its metadata reads."""
    try:
        if not store.split_created(split):
            return False
        store.split(split).check_metadata()
        return True
    except StoreError as err:
        log.warning("%s", err)
        return False


def _rows_to_write(part: SplitStore) -> int:
    return sum(stop - start for start, stop in map(part.block_range, part.missing_blocks()))


def _check_size(
    path: Path,
    specs: tuple[list[ArraySpec], list[ArraySpec]],
    rows: dict[str, np.ndarray],
    views: dict[str, int],
    resumed: dict[str, SplitStore],
    max_gb: float | None,
) -> None:
    """Refuses an extraction whose store would exceed `max_gb` GiB, or whose rows still to write (those of the
    `resumed` splits' missing blocks, every row of the others, per view) exceed the free space of the output's file
    system. Sizes are raw bytes: compression only makes the store smaller."""
    plain, view = (sum(s.row_bytes for s in group) for group in specs)
    total = left = 0
    for split, split_rows in rows.items():
        for v in range(views[split]):
            row_bytes = plain if v == 0 else view
            total += len(split_rows) * row_bytes
            left += row_bytes * (_rows_to_write(resumed[split].view(v)) if split in resumed else len(split_rows))
        if views[split] > 1:
            log.info("split %s: %d views of %s raw each", split, views[split], _size(len(split_rows) * view))
    free = None if is_remote(path) else shutil.disk_usage(path.parent).free  # object storage: no such bound
    free_text = "unbounded (object storage)" if free is None else _size(free)
    count = sum(map(len, rows.values()))
    per_view = " a view" if max(views.values()) > 1 else ""
    log.info(
        "%s: %s raw (%d rows of %s%s), %s of it to write, %s free; compression only makes it smaller",
        *(path, _size(total), count, _size(plain), per_view, _size(left), free_text),
    )
    fewer = "cache fewer taps (--layers) or samples (--max-samples)"
    if max_gb is not None and total > max_gb * 2**30:
        raise UserError(f"{path} would hold {_size(total)} raw, above --max-store-gb={max_gb:g}; {fewer}")
    if free is not None and left > free:
        raise UserError(
            f"{path} needs {_size(left)} raw but {path.parent} has {_size(free)} free; free space or {fewer}"
        )


def _size(num_bytes: int) -> str:
    unit, scale = next(
        (u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)) if num_bytes >= s or u == "B"
    )
    return f"{num_bytes / scale:.1f} {unit}"


def _create(path: Path, identity: StoreIdentity, places: dict[str, Any], overwrite: bool) -> FeatureStore:
    """A new, empty store at `path` (replacing the one there with `overwrite`); the files describing whatever store
    was there before (its scores, extract.json) are removed."""
    meta = {
        "kdpipe_version": __version__,
        "identity": identity.to_json(),
        "config_hash": identity.config_hash,
        **places,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store = FeatureStore.create(path, meta, overwrite=overwrite)
    for stale in derived_files(path):
        if stale.is_file():
            stale.unlink()
            log.info("removed %s: it described the store replaced", stale)
    return store


def tap_bytes(tap: Tap) -> int:
    """What one image's output of `tap` takes in a store, before compression."""
    return math.prod(tap.shape) * np.dtype(FEATURE_DTYPE).itemsize


def _array_specs(taps: list[Tap], logits: bool, num_classes: int) -> list[ArraySpec]:
    """View 0's arrays, the split's own: the teacher's outputs and each row's label and dataset index."""
    specs = [ArraySpec(feature_path(t.name), t.shape, FEATURE_DTYPE) for t in taps]
    specs += [ArraySpec(LABELS, (), "int64", sets_block=False), ArraySpec(INDICES, (), "int64", sets_block=False)]
    return specs + _logits_spec(logits, num_classes)


def _view_specs(taps: list[Tap], logits: bool, num_classes: int) -> list[ArraySpec]:
    """An augmented view's arrays: the teacher's outputs on it and the parameters that replay it."""
    specs = [ArraySpec(feature_path(t.name), t.shape, FEATURE_DTYPE) for t in taps]
    columns = {"columns": list(PARAMS)}
    specs.append(ArraySpec(PARAMS_ARRAY, (len(PARAMS),), "int32", sets_block=False, attributes=columns))
    return specs + _logits_spec(logits, num_classes)


def _logits_spec(logits: bool, num_classes: int) -> list[ArraySpec]:
    return [ArraySpec(LOGITS, (num_classes,), "float32", sets_block=False)] if logits else []


def _extract_split(
    model,
    images: ViewImages,
    part: SplitStore,
    missing: list[list[int]],
    taps: list[Tap],
    logits: bool,
    config: ExtractConfig,
    precision: Precision,
    world: distributed.World,
) -> dict[str, float]:
    """Feeds this rank's share of the `missing` blocks of every view of the split through the teacher into a
    background writer, view by view; returns timing figures."""
    start, done = time.perf_counter(), 0
    for view, blocks in enumerate(missing):
        part_view = part.view(view)
        done += _extract_view(model, images, part_view, view, world.shard(blocks), taps, logits, config, precision)
    seconds = time.perf_counter() - start
    return {"images": done, "seconds": round(seconds, 3), "images_per_second": round(done / max(seconds, 1e-9), 1)}


def _extract_view(
    model,
    images: ViewImages,
    part: SplitStore,
    view: int,
    blocks: list[int],
    taps: list[Tap],
    logits: bool,
    config: ExtractConfig,
    precision: Precision,
) -> int:
    """Writes `blocks` of one view (`part`, the split itself for view 0); returns the images written."""
    batch_size = config.batch_size
    positions = np.concatenate([np.arange(*part.block_range(b)) for b in blocks]) if blocks else np.array([], int)
    if len(positions) == 0:
        return 0
    keys = [(int(p), view) for p in positions]
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = make_loader(images, workers=config.workers, batch_sampler=batches, pin_memory=precision.pin_memory)
    names = [t.name for t in taps]
    slots = HalfSlots({feature_path(t.name): t.shape for t in taps}, batch_size, count=QUEUE_BATCHES + 2)
    desc = f"extract {part.name}" if view == 0 else f"extract {part.name} ({view + 1} of {part.num_views})"
    bar = progress(total=len(positions), desc=desc, unit="img", unit_scale=True, smoothing=0.1)
    with (
        torch.no_grad(),
        precision.autocast(),  # the features come out in bf16/fp16, cast to float16 (and checked) by `slots`
        TapRecorder(model, names, stop_after_last=not logits) as recorder,
        SplitWriter(part, blocks, queue_size=QUEUE_BATCHES) as writer,
    ):
        for pixels, labels, rows, params in loader:
            features = recorder.run(precision.batch(pixels))
            batch, release = slots.fill({feature_path(n): f for n, f in features.items()})
            if view == 0:
                batch[LABELS] = labels.numpy().astype(np.int64)
                batch[INDICES] = images.indices[rows.numpy()]
            else:
                batch[PARAMS_ARRAY] = params.numpy()
            if logits:
                batch[LOGITS] = recorder.logits.float().cpu().numpy()
            writer.put(batch, on_written=release)
            bar.update(len(labels))
    bar.close()
    return len(positions)


class HalfSlots:
    """A few reusable float16 host buffers for the batches in flight to the writer.

    Converting into preallocated buffers (and reusing them once the writer has copied a batch out) avoids
    allocating and page-faulting fresh arrays every batch, which measurably slowed the teacher's forward pass.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], batch_size: int, count: int) -> None:
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put({k: torch.empty((batch_size, *s), dtype=torch.float16) for k, s in shapes.items()})

    def fill(self, features: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], Callable[[], None]]:
        slot = self._free.get()
        arrays = {}
        for key, value in features.items():
            target = slot[key][: len(value)]
            target.copy_(value.detach())
            arrays[key] = target.numpy()
        return arrays, lambda: self._free.put(slot)


def _combined(timings: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The ranks' timing figures of each split as one run's: their images summed over the slowest rank's time."""
    combined = {}
    for split in timings[0]:
        images = sum(t[split]["images"] for t in timings)
        seconds = max(t[split]["seconds"] for t in timings)
        combined[split] = {
            "images": images,
            "seconds": seconds,
            "images_per_second": round(images / max(seconds, 1e-9), 1),
        }
        if len(timings) > 1:
            combined[split]["processes"] = len(timings)
    return combined


def _summary(store: FeatureStore, timings: dict[str, dict[str, float]], out: Path) -> dict[str, Any]:
    """Throughput and raw vs stored bytes per split and array; written to `out/extract.json`."""
    splits = {}
    for part in store.splits():
        arrays = {
            view_path(v, a.path): {"raw_bytes": a.raw_bytes, "stored_bytes": a.stored_bytes}
            for v, view in enumerate(part.views())
            for a in view.stored_arrays()
        }
        raw = sum(a["raw_bytes"] for a in arrays.values())
        stored = sum(a["stored_bytes"] for a in arrays.values())
        splits[part.name] = {
            "num_samples": part.num_samples,
            "raw_bytes": raw,
            "stored_bytes": stored,
            "stored_over_raw": round(stored / raw, 4) if raw else None,
            "views": part.num_views,
            "arrays": arrays,
            **timings.get(part.name, {}),
        }
    summary = {
        "stage": "extract",
        "store": str(store.path),
        "complete": store.complete,
        "config_hash": store.provenance.config_hash,
        "splits": splits,
    }
    write_json(out / EXTRACT_SUMMARY, summary)
    return summary
