"""`kdpipe info`: what a feature store holds, how big it is, where it came from and whether it is complete."""

from __future__ import annotations

from pathlib import Path

from cache.schema import PARAMS_ARRAY, VIEWS
from cache.store import FeatureStore

from ..data.augment import Augmentation
from ..distillation.picks import store_picks
from ..models.taps import Tap


def describe_store(path: str | Path) -> str:
    """The report of `kdpipe info`; StoreError when the store's metadata is missing or unreadable."""
    store = FeatureStore.open(path)
    provenance, identity = store.provenance, store.identity
    teacher, dataset = identity.teacher, identity.dataset
    lines = [
        f"store       {store.path}",
        f"complete    {'yes' if store.complete else 'NO (resume with the same kdpipe extract command)'}",
        f"teacher     {teacher.name}  checkpoint sha256 {(teacher.checkpoint_sha256 or 'none')[:16]}"
        f"  ({provenance.checkpoint_path or 'pretrained'})",
        f"dataset     {dataset.name}  {dataset.num_classes} classes  preprocessing {dataset.preprocessing}",
        f"created     {provenance.created} by kdpipe {provenance.kdpipe_version}  config {provenance.config_hash[:16]}",
        f"head        {teacher.head}  logits {'cached' if identity.logits else 'none'}",
        f"forward     {_precision(identity.amp)}",
        f"taps        {'name':28s} {'role':10s} {'layout':26s} shape",
    ]
    lines += [
        f"            {t.name:28s} {t.role:10s} {t.describe():26s} {t.shape}"
        for t in map(Tap.from_record, identity.taps)
    ]
    picked = store_picks(store, None)
    if picked:
        lines.append(f"picked by   {picked.source}  (top {picked.top_k}, seed {picked.seed})")
    augment = identity.augment
    if augment:
        lines.append(
            f"views       {augment['views']} per training image: view 0 plain, 1..{augment['views'] - 1} "
            f"{Augmentation.from_record(augment).describe()}, seed {augment['seed']}"
        )
    for name in store.expected_splits():
        if not store.split_created(name):
            lines.append(f"split {name}: not written (rerun the same kdpipe extract)")
            continue
        part = store.split(name)
        missing = len(part.missing_blocks())
        state = "complete" if part.complete else f"{missing}/{part.num_blocks} blocks missing"
        record = part.record
        lines.append(
            f"split {part.name}: {part.num_samples} of {record.dataset_size} samples, "
            f"fingerprint {(record.fingerprint or 'none')[:16]}, {state}"
        )
        lines.append(f"  {'array':32s} {'shape':22s} {'dtype':8s} {'chunk':>6s} {'raw MiB':>9s} {'stored MiB':>10s}")
        raw_total = stored_total = 0
        for a in part.stored_arrays():
            raw_total, stored_total = raw_total + a.raw_bytes, stored_total + a.stored_bytes
            lines.append(
                f"  {a.path:32s} {str(a.shape):22s} {a.dtype:8s} {a.chunk_rows:>6d} "
                f"{a.raw_bytes / 2**20:>9.2f} {a.stored_bytes / 2**20:>10.2f}"
            )
        lines.append(_total_line("total" if part.num_views == 1 else "view 0", raw_total, stored_total))
        for v, view in enumerate(part.views()[1:], start=1):
            arrays = view.stored_arrays()
            raw, stored = sum(a.raw_bytes for a in arrays), sum(a.stored_bytes for a in arrays)
            missing = len(view.missing_blocks())
            state = "" if not missing else f"  {missing}/{view.num_blocks} blocks missing"
            label = f"view {v} ({VIEWS}/{v}/, with {PARAMS_ARRAY})"
            lines.append(_total_line(label, raw, stored) + state)
    return "\n".join(lines)


def _precision(amp: str) -> str:
    return "float32" if amp == "off" else f"{amp} autocast (--amp {amp}), stored as float16"


def _total_line(label: str, raw: int, stored: int) -> str:
    ratio = stored / raw if raw else float("nan")
    return (
        f"  {label:32s} {'':22s} {'':8s} {'':>6s} {raw / 2**20:>9.2f} {stored / 2**20:>10.2f}  (stored/raw {ratio:.2f})"
    )
