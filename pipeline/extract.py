"""`kdpipe extract`: run the teacher once (eval, no grad) and cache its tap features, labels and logits.

The store's identity is a hash of everything that determines its contents (teacher, weights, data, preprocessing,
taps, subset); re-running on an incomplete store with the same identity resumes at the missing blocks, on a
complete one it does nothing, and on a different one it refuses unless told to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import queue
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from cache.store import (
    DEFAULT_COMPRESSION,
    FEATURES,
    compressors,
    STORE_NAME,
    ArraySpec,
    FeatureStore,
    SplitStore,
    StoreError,
    stored_bytes,
)
from cache.writer import SplitWriter

from . import __version__
from .datasets import SplitData, load_split
from .errors import UserError
from .models import MODELS, PREFIXES, create_model, file_sha256, load_checkpoint, read_model_spec
from .recipe import make_loader
from .runtime import resolve_device, seed_everything, write_json
from .taps import Tap, TapRecorder, list_taps

FEATURE_DTYPE = "float16"
QUEUE_BATCHES = 8  # batches the writer may lag behind the teacher


def extract(
    teacher: str,
    dataset: str,
    out: str,
    checkpoint: str | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_root: str | None = None,
    input_size: int | None = None,
    splits: tuple[str, ...] = ("train",),
    layers: tuple[str, ...] = (),
    logits: bool = True,
    max_samples: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    workers: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    download: bool = False,
    compression: str = DEFAULT_COMPRESSION,
) -> dict[str, Any]:
    """Extracts every requested split into `out/features.zarr` and writes `out/extract.json`; returns that summary."""
    dev = resolve_device(device)
    compressors(compression)  # a bad codec string fails before anything is written
    if not splits:
        raise UserError("--splits names no split")
    seed_everything(seed)
    data = {split: load_split(dataset, split, data_root, input_size, download) for split in splits}
    first = data[splits[0]]
    model = load_teacher(
        teacher, checkpoint, pretrained, model_kwargs, first.num_classes, first.preprocessing.input_size
    )
    model.to(dev).eval()
    taps = list_taps(model, first.preprocessing.input_size, names=list(layers) or None)
    rows = {split: _select_rows(d, max_samples, seed) for split, d in data.items()}
    identity = {
        "teacher": {
            "name": teacher,
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
            "pretrained": pretrained,
            "model_kwargs": model_kwargs or {},
        },
        "dataset": {
            "name": dataset,
            "num_classes": first.num_classes,
            "classes": first.classes,
            "preprocessing": first.preprocessing.to_dict(),
            "splits": {s: {"fingerprint": d.fingerprint(), "size": len(d)} for s, d in data.items()},
        },
        "taps": [{"index": t.index, "name": t.name, "shape": list(t.shape), "kind": t.kind} for t in taps],
        "feature_dtype": FEATURE_DTYPE,
        "logits": logits,
        "max_samples": max_samples,
        "subset_seed": seed if max_samples else None,
    }
    store = _open_or_create(Path(out) / STORE_NAME, identity, checkpoint, overwrite)
    if store.complete:
        tqdm.write(f"{store.path} is already complete; nothing to do")
        return _summary(store, {}, Path(out))
    timings = {}
    for split, d in data.items():
        part = _split_store(store, split, d, rows[split], taps, logits, first.num_classes, compression)
        timings[split] = _extract_split(model, d, part, rows[split], taps, logits, batch_size, workers, dev)
    store.mark_complete()
    return _summary(store, timings, Path(out))


def load_teacher(
    name: str,
    checkpoint: str | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
    num_classes: int,
    input_size: int,
) -> torch.nn.Module:
    """The teacher with its weights; a missing, unreadable or mismatched checkpoint is a UserError."""
    if not name.startswith(PREFIXES):
        MODELS.get(name)  # an unknown name is reported before anything is read
    if checkpoint is None and not pretrained:
        raise UserError("the teacher needs weights: pass --checkpoint FILE (or --pretrained for timm/torchvision)")
    spec = read_model_spec(checkpoint) if checkpoint and Path(checkpoint).is_file() else None
    if spec and spec.get("model") != name:
        raise UserError(f"checkpoint {checkpoint} holds a {spec.get('model')!r}, not a {name!r}")
    if spec and spec.get("num_classes") != num_classes:
        raise UserError(f"checkpoint {checkpoint} has {spec.get('num_classes')} classes; the dataset has {num_classes}")
    if spec and not model_kwargs:
        model_kwargs = spec.get("model_kwargs") or None
    model = create_model(name, num_classes, input_size=input_size, pretrained=pretrained, model_kwargs=model_kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def _select_rows(data: SplitData, max_samples: int | None, seed: int) -> np.ndarray:
    """Dataset indices to cache: all of them, or a seeded class-stratified subset, in ascending order."""
    if max_samples is None or max_samples >= len(data):
        return np.arange(len(data))
    if max_samples < data.num_classes:
        raise UserError(f"--max-samples {max_samples} is below the number of classes ({data.num_classes})")
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(len(data)), train_size=max_samples, stratify=data.labels, random_state=seed)
    return np.sort(chosen)


def config_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _open_or_create(path: Path, identity: dict[str, Any], checkpoint: str | None, overwrite: bool) -> FeatureStore:
    wanted = config_hash(identity)
    if path.exists():
        try:
            store = FeatureStore.open(path, mode="r+")
        except StoreError as err:
            if not overwrite:
                raise UserError(f"{path} exists and is not a kdpipe store ({err}); choose another --out") from err
            store = None
        if store is not None and store.meta.get("config_hash") == wanted:
            return store  # the same store: resume it (or find it complete), even with --overwrite
        if store is not None and not overwrite:
            field = _first_difference(store.meta.get("identity", {}), identity)
            raise UserError(f"{path} holds a different store ({field} differs); use another --out or pass --overwrite")
    meta = {
        "kdpipe_version": __version__,
        "identity": identity,
        "config_hash": wanted,
        "checkpoint_path": str(checkpoint) if checkpoint else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return FeatureStore.create(path, meta, overwrite=overwrite)


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    """The dotted path of the first field where two identity records differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} ({_short(old)} vs {_short(new)})" if prefix else "format"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _split_store(
    store: FeatureStore,
    split: str,
    data: SplitData,
    rows: np.ndarray,
    taps: list[Tap],
    logits: bool,
    num_classes: int,
    compression: str,
) -> SplitStore:
    if split in store.split_names():
        if store.split_created(split):
            return store.split(split)
        store.remove_split(split)  # its creation was interrupted: nothing in it was written
    specs = [ArraySpec(f"{FEATURES}/{t.name}", t.shape, FEATURE_DTYPE) for t in taps]
    specs += [ArraySpec("labels", (), "int64", sets_block=False), ArraySpec("indices", (), "int64", sets_block=False)]
    if logits:
        specs.append(ArraySpec("logits", (num_classes,), "float32", sets_block=False))
    attrs = {"split": split, "dataset_size": len(data), "fingerprint": data.fingerprint()}
    return store.create_split(split, len(rows), specs, [t.name for t in taps], attrs, compression)


def _extract_split(
    model,
    data: SplitData,
    part: SplitStore,
    rows: np.ndarray,
    taps: list[Tap],
    logits: bool,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> dict[str, float]:
    """Feeds the split's missing blocks through the teacher into a background writer; returns timing figures."""
    blocks = part.missing_blocks()
    positions = np.concatenate([np.arange(*part.block_range(b)) for b in blocks]) if blocks else np.array([], int)
    if len(positions) == 0:
        part.mark_complete()
        return {"images": 0, "seconds": 0.0}
    loader = make_loader(Subset(data, rows[positions].tolist()), batch_size, workers)
    names = [t.name for t in taps]
    slots = HalfSlots({f"{FEATURES}/{t.name}": t.shape for t in taps}, batch_size, count=QUEUE_BATCHES + 2)
    start, done = time.perf_counter(), 0
    bar = tqdm(total=len(positions), desc=f"extract {part.name}", unit="img", unit_scale=True, smoothing=0.1)
    with (
        torch.no_grad(),
        TapRecorder(model, names, stop_after_last=not logits) as recorder,
        SplitWriter(part, blocks, queue_size=QUEUE_BATCHES) as writer,
    ):
        for images, labels in loader:
            features = recorder.run(images.to(device, non_blocking=True))
            batch, release = slots.fill({f"{FEATURES}/{n}": f for n, f in features.items()})
            batch["labels"] = labels.numpy().astype(np.int64)
            batch["indices"] = rows[positions[done : done + len(labels)]]
            if logits:
                batch["logits"] = recorder.logits.float().cpu().numpy()
            writer.put(batch, on_written=release)
            done += len(labels)
            bar.update(len(labels))
    bar.close()
    part.mark_complete()
    seconds = time.perf_counter() - start
    return {"images": done, "seconds": round(seconds, 3), "images_per_second": round(done / seconds, 1)}


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


def _summary(store: FeatureStore, timings: dict[str, dict[str, float]], out: Path) -> dict[str, Any]:
    """Throughput and raw vs stored bytes per split and array; written to `out/extract.json`."""
    splits = {}
    for part in store.splits():
        arrays = {
            path: {"raw_bytes": int(arr.nbytes), "stored_bytes": stored_bytes(store.path, arr)}
            for path, arr in part.arrays().items()
        }
        raw = sum(a["raw_bytes"] for a in arrays.values())
        stored = sum(a["stored_bytes"] for a in arrays.values())
        splits[part.name] = {
            "num_samples": part.num_samples,
            "raw_bytes": raw,
            "stored_bytes": stored,
            "stored_over_raw": round(stored / raw, 4) if raw else None,
            "arrays": arrays,
            **timings.get(part.name, {}),
        }
    summary = {
        "stage": "extract",
        "store": str(store.path),
        "complete": store.complete,
        "config_hash": store.meta["config_hash"],
        "splits": splits,
    }
    write_json(out / "extract.json", summary)
    return summary
