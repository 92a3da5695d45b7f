"""`kdpipe distill`: train a student backbone against cached teacher features, with feature losses only.

Per epoch the cached targets decide the sample order (`cache.reader.CachedTargets`), the matching images are
loaded by row, the method returns its named losses and AdamW + OneCycle step once per batch. Each epoch ends
with a checkpoint (safetensors weights, then optimizer/schedule state), so `--resume` continues an interrupted
run and reproduces the uninterrupted one exactly: the order of epoch e depends only on (seed, e).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from cache.reader import CachedTargets
from cache.store import FeatureStore, SplitStore

from . import __version__
from .datasets import SplitData, held_out_split, load_split, stratified_subset
from .errors import UserError
from .extract import load_teacher
from .methods import Distiller, Method, get_method
from .models import create_model, file_sha256, save_checkpoint
from .provenance import load_matching_split, open_complete_store
from .quality import select_top_k
from .recipe import adamw_onecycle, evaluate_top1, make_loader
from .runtime import resolve_device, seed_everything, write_csv, write_json
from .taps import Tap, TapRecorder, list_taps, stage_end_taps

STUDENT_FILE = "student.safetensors"
SUMMARY_FILE = "distill.json"
LABELLED_FILE = "labelled_indices.npy"  # dataset indices of the labelled train images, for the probe
CHECKPOINT = re.compile(r"epoch-(\d+)\.state\.pt$")


class RowImages(Dataset):
    """Images addressed by store row: row r is dataset sample `indices[r]`; returns (image, r) to check pairing."""

    def __init__(self, data: SplitData, indices: np.ndarray) -> None:
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int]:
        return self.data[int(self.indices[row])][0], row

    def __getitems__(self, rows: list[int]) -> list[tuple[torch.Tensor, int]]:
        images = self.data.__getitems__([int(self.indices[r]) for r in rows])
        return [(image, row) for (image, _), row in zip(images, rows)]


class OnlineTeacher:
    """The teacher run on every batch (eval, no grad) instead of reading the cache: same taps, same loss.

    For users who need fresh targets (e.g. with augmentation), and the baseline the cache is measured against.
    """

    def __init__(self, model: torch.nn.Module, taps: list[str]) -> None:
        self.model, self.taps = model.eval(), taps
        self._recorder = TapRecorder(model, taps, stop_after_last=True).attach()

    @classmethod
    def from_store(
        cls, store: FeatureStore, taps: list[str], checkpoint: str | None, num_classes: int, input_size: int
    ) -> "OnlineTeacher":
        """Rebuilds the store's teacher; its weights must be the ones the store was extracted with."""
        teacher = store.meta["identity"]["teacher"]
        checkpoint = checkpoint or store.meta.get("checkpoint_path")
        if teacher["checkpoint_sha256"] and (not checkpoint or not Path(checkpoint).is_file()):
            raise UserError(f"--online-teacher: teacher weights not found at {checkpoint}; pass --teacher-checkpoint")
        if checkpoint and file_sha256(checkpoint) != teacher["checkpoint_sha256"]:
            raise UserError(f"--online-teacher: {checkpoint} is not the checkpoint {store.path} was extracted with")
        model = load_teacher(
            teacher["name"],
            checkpoint,
            teacher.get("pretrained", False),
            teacher.get("model_kwargs") or None,
            num_classes,
            input_size,
        )
        return cls(model, taps)

    def to(self, device: torch.device) -> "OnlineTeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self._recorder.run(images)
        return [features[t] for t in self.taps]


def distill(
    store: str,
    out: str,
    student: str = "resnet9",
    method: str = "feature",
    teacher_layers: tuple[str, ...] = (),
    student_layers: tuple[str, ...] = (),
    model_kwargs: dict[str, Any] | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    epochs: int = 20,
    steps: int | None = None,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 0.01,
    temperature: float = 4.0,
    label_fraction: float = 1.0,
    unlabelled_distill: bool = True,
    cache_memory_gb: float = 4.0,
    online_teacher: bool = False,
    teacher_checkpoint: str | None = None,
    seed: int = 0,
    device: str = "auto",
    workers: int = 0,
    resume: bool = False,
    checkpoint_seconds: float = 60.0,
    check: bool = False,
) -> dict[str, Any]:
    """Trains `student` with `method` on the store's train split into `out`; returns the summary (distill.json).

    `steps` fixes the number of optimizer steps (the last epoch is cut short) so that methods training on
    different numbers of rows share one budget; without it the run lasts `epochs` epochs. `check` validates
    everything a run would (store, data, taps, cached arrays, budget, an existing run in `out`) and returns the
    run's spec without training or writing. A checkpoint is written after an epoch once `checkpoint_seconds` have
    passed since the last one (0: after every epoch), and after the last epoch.
    """
    dev = resolve_device(device)
    recipe = get_method(method)
    feature_store, part = open_complete_store(store)
    data = load_matching_split(feature_store, "train", dataset, data_root)
    seed_everything(seed)
    net = create_model(student, data.num_classes, input_size=data.preprocessing.input_size, model_kwargs=model_kwargs)
    student_taps, teacher_taps = _pair_taps(
        recipe, feature_store, part, net, data.preprocessing.input_size, teacher_layers, student_layers
    )
    distiller = Distiller(net, recipe, student_taps, teacher_taps, temperature).to(dev)
    rows, labelled = _training_rows(part, recipe, label_fraction, unlabelled_distill, seed)
    teacher = None
    if online_teacher and teacher_taps:
        teacher = OnlineTeacher.from_store(
            feature_store,
            [t.name for t in teacher_taps],
            teacher_checkpoint,
            data.num_classes,
            data.preprocessing.input_size,
        ).to(dev)
    # Online, the teacher supplies the features; labels and logits still come from the cache.
    paths = [p for p in distiller.inputs if not (teacher and p in distiller.teacher_targets)]
    missing = [p for p in paths if p not in part.group.attrs["arrays"]]
    if missing:
        raise UserError(f"--method {method} reads {missing[0]}, which {feature_store.path} does not hold")
    num_rows = part.num_samples if rows is None else len(rows)
    steps_per_epoch, total_steps, epochs = _step_budget(num_rows, batch_size, epochs, steps)
    optimizer, schedule = adamw_onecycle(distiller.parameters(), lr, weight_decay, total_steps)
    spec = {
        "kdpipe_version": __version__,
        "method": method,
        "losses": list(recipe.losses),
        "model": student,
        "model_kwargs": model_kwargs or {},
        "num_classes": data.num_classes,
        "input_size": data.preprocessing.input_size,
        "dataset": data.name,
        "store": str(feature_store.path.resolve()),
        "store_config_hash": feature_store.meta["config_hash"],
        "student_taps": [t.name for t in student_taps],
        "teacher_taps": [t.name for t in teacher_taps],
        "epochs": epochs,
        "steps": total_steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "temperature": temperature if "kd" in recipe.losses else None,  # unused settings do not block a resume
        "label_fraction": label_fraction,
        "unlabelled_distill": unlabelled_distill if labelled is not None and not recipe.uses_labels else None,
        "num_labelled": len(labelled) if labelled is not None else part.num_samples,
        "num_training_rows": num_rows,
        "seed": seed,
        "online_teacher": bool(teacher),
    }
    out_dir = Path(out)
    log_rows, first_epoch = _start_or_resume(out_dir, resume, spec, distiller, optimizer, schedule)
    if check:
        return {"stage": "distill", "checked": True, **spec}
    if first_epoch > epochs and (out_dir / SUMMARY_FILE).is_file():
        return json.loads((out_dir / SUMMARY_FILE).read_text())  # a finished run: reused, not recomputed
    targets = CachedTargets(part, paths, int(cache_memory_gb * 2**30), rows=rows)
    images = RowImages(data, part.array("indices")[:])
    start = last_save = time.perf_counter()
    for epoch in range(first_epoch, epochs + 1):
        batches = min(steps_per_epoch, total_steps - (epoch - 1) * steps_per_epoch)
        row = _train_epoch(
            distiller,
            optimizer,
            schedule,
            targets,
            teacher,
            images,
            epoch,
            epochs,
            batches,
            batch_size,
            seed,
            dev,
            workers,
        )
        log_rows.append(row)
        # Short epochs (a small labelled subset) are not each worth a checkpoint.
        if epoch == epochs or time.perf_counter() - last_save >= checkpoint_seconds:
            _save_checkpoint(out_dir, epoch, spec, distiller, optimizer, schedule, log_rows)
            write_csv(out_dir / "distill_log.csv", log_rows)
            last_save = time.perf_counter()
    save_checkpoint(net, out_dir / STUDENT_FILE, spec)
    np.save(out_dir / LABELLED_FILE, images.indices[labelled if labelled is not None else slice(None)])
    summary = {
        "stage": "distill",
        **spec,
        "pairs": [
            {"student": s.name, "student_shape": list(s.shape), "teacher": t.name, "teacher_shape": list(t.shape)}
            for s, t in zip(student_taps, teacher_taps)
        ],
        "final": log_rows[-1],
        **(_evaluate_classifier(net, data, data_root, batch_size, workers, dev) if recipe.uses_labels else {}),
        "targets": "online teacher" if teacher else "cache in RAM" if targets.in_memory else "cache streamed",
        "device": str(dev),
        "seconds_this_run": round(time.perf_counter() - start, 2),
        "weights": str(out_dir / STUDENT_FILE),
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def _pair_taps(
    method: Method,
    store: FeatureStore,
    part: SplitStore,
    net: torch.nn.Module,
    input_size: int,
    teacher_layers: tuple[str, ...],
    student_layers: tuple[str, ...],
) -> tuple[list[Tap], list[Tap]]:
    """(student taps, teacher taps) paired in depth order, as the method asks.

    The number of pairs k comes from `--teacher-layers`, else `--student-layers`, else the method: the store's
    picks (`feature`) or the teacher's stage ends (`feature-standard`, `fitnet`). A method without a feature
    loss pairs nothing and ignores both options (one config can then serve every method of a comparison).
    """
    if method.teacher_taps is None:
        return [], []
    k = len(teacher_layers) or len(student_layers) or None
    if teacher_layers:
        teacher = _recorded_taps(store, teacher_layers)
    elif method.teacher_taps == "picked":
        teacher = _picked_taps(store, part, k)
    else:
        teacher = _standard_taps(store, k)
    return _student_taps(net, input_size, student_layers, len(teacher)), teacher


def _recorded_taps(store: FeatureStore, names: list[str] | tuple[str, ...], why: str = "") -> list[Tap]:
    """The cached teacher taps `names`, in depth order."""
    recorded = {t["name"]: Tap(t["index"], t["name"], tuple(t["shape"])) for t in store.meta["identity"]["taps"]}
    unknown = [n for n in names if n not in recorded]
    if unknown:
        raise UserError(f"teacher tap {unknown[0]!r}{why} is not in {store.path}; it holds {', '.join(recorded)}")
    return sorted((recorded[n] for n in names), key=lambda t: t.index)


def _picked_taps(store: FeatureStore, part: SplitStore, k: int | None) -> list[Tap]:
    """The store's picks from `kdpipe score`, or the top k by its recorded Q when k differs from its top-k."""
    scores = part.group.attrs.get("scores")
    if not scores:
        raise UserError(f"{store.path} has no scores; run `kdpipe score` first or pass --teacher-layers")
    if k is None or k == len(scores["selected"]):
        return _recorded_taps(store, scores["selected"])
    scored = _recorded_taps(store, list(scores["Q"]))
    qualities = [math.nan if scores["Q"][t.name] is None else float(scores["Q"][t.name]) for t in scored]
    return [scored[i] for i in select_top_k(qualities, k)]


def _standard_taps(store: FeatureStore, k: int | None) -> list[Tap]:
    """The teacher's stage ends (its `feature_info`), spread to k when k is given; they must be cached."""
    teacher = store.meta["identity"]["teacher"]
    input_size = store.meta["identity"]["dataset"]["preprocessing"]["input_size"]
    with torch.random.fork_rng():  # building the architecture must not move the student's random stream
        model = create_model(
            teacher["name"],
            store.meta["identity"]["dataset"]["num_classes"],
            input_size=input_size,
            model_kwargs=teacher.get("model_kwargs") or None,
        )
    taps = list_taps(model, input_size)
    ends = _pairable(taps, stage_end_taps(taps, model))
    if not ends:
        raise UserError(f"teacher {teacher['name']} declares no stages (feature_info); pass --teacher-layers")
    k = k or len(ends)
    if k > len(ends):
        raise UserError(
            f"teacher {teacher['name']} has {len(ends)} stage ends for {k} pairs; "
            "pass --teacher-layers or fewer --student-layers"
        )
    return _recorded_taps(store, [t.name for t in _spread(ends, k)], " (a stage end of the teacher)")


def _step_budget(num_rows: int, batch_size: int, epochs: int, steps: int | None) -> tuple[int, int, int]:
    """(steps per epoch, total steps, epochs): `steps` when given, the last epoch then cut short; else whole epochs."""
    steps_per_epoch = num_rows // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {batch_size} exceeds the {num_rows} training samples")
    total_steps = steps or epochs * steps_per_epoch
    return steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch)


def _training_rows(
    part: SplitStore, method: Method, label_fraction: float, unlabelled_distill: bool, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rows trained on, labelled rows): None means all. Label methods, and every method with
    `unlabelled_distill` off, see only the labelled subset; feature methods otherwise distill on every row."""
    if label_fraction >= 1.0:
        return None, None
    try:
        labelled = stratified_subset(part.array("labels")[:], label_fraction, seed)
    except UserError as err:
        raise UserError(f"--label-fraction {label_fraction:g}: {err}") from None
    return (labelled if method.uses_labels or not unlabelled_distill else None), labelled


def _evaluate_classifier(net, data: SplitData, data_root, batch_size: int, workers: int, dev) -> dict[str, Any]:
    """Last-epoch top-1 of the student's own classifier on the held-out split, evaluated once."""
    held_out = load_split(data.name, held_out_split(data.name), data_root, data.preprocessing.input_size)
    return {
        "test_split": held_out.split,
        "test_top1": evaluate_top1(net, make_loader(held_out, batch_size, workers), dev),
        "num_test": len(held_out),
    }


def _pairable(taps: list[Tap], names: list[str] | None = None) -> list[Tap]:
    """Taps that may be paired (of `names`, if given): never the first (stem or patch embedding), never a vector."""
    return [t for t in taps[1:] if t.kind != "vector" and (names is None or t.name in names)]


def _spread(candidates: list[Tap], k: int) -> list[Tap]:
    """k of the candidates spread evenly over depth, ending at the last."""
    return [candidates[round((i + 1) * len(candidates) / k) - 1] for i in range(k)]


def spread_taps(taps: list[Tap], stage_ends: list[str], k: int) -> list[Tap]:
    """The default student taps: k stage ends spread over depth, or k blocks when there are fewer stages."""
    ends, blocks = _pairable(taps, stage_ends), _pairable(taps)
    candidates = ends if len(ends) >= k else blocks
    if len(candidates) < k:
        raise UserError(f"the student has only {len(candidates)} taps for {k} pairs; pass --student-layers")
    return _spread(candidates, k)


def _student_taps(net: torch.nn.Module, input_size: int, requested: tuple[str, ...], k: int) -> list[Tap]:
    if requested:
        taps = list_taps(net, input_size, names=list(requested))
        if len(taps) != k:
            raise UserError(f"{len(taps)} student taps for {k} teacher taps; they pair one-to-one in depth order")
        return taps
    taps = list_taps(net, input_size)
    return spread_taps(taps, stage_end_taps(taps, net), k)


def _train_epoch(
    distiller,
    optimizer,
    schedule,
    targets: CachedTargets,
    teacher: OnlineTeacher | None,
    images: RowImages,
    epoch: int,
    epochs: int,
    num_batches: int,
    batch_size: int,
    seed: int,
    dev: torch.device,
    workers: int,
) -> dict[str, Any]:
    distiller.train()
    windows = targets.epoch_order(np.random.default_rng([seed, epoch]))
    order = np.concatenate(windows)
    row_batches = order[: num_batches * batch_size].reshape(-1, batch_size).tolist()
    loader = make_loader(images, workers=workers, batch_sampler=row_batches)
    sums: dict[str, float] = {}
    start, seen = time.perf_counter(), 0
    bar = tqdm(
        zip(loader, targets.batches(windows, batch_size)),
        total=len(row_batches),
        desc=f"distill {epoch}/{epochs}",
        unit="batch",
        leave=False,
    )
    for (images_batch, rows), (target_rows, target_values) in bar:
        if not np.array_equal(rows.numpy(), target_rows):
            raise RuntimeError("images and cached targets went out of step")
        images_batch = images_batch.to(dev)
        batch = {path: torch.from_numpy(v).to(dev) for path, v in zip(targets.paths, target_values)}
        if teacher:
            batch.update(zip(distiller.teacher_targets, teacher(images_batch)))
        _, losses = distiller(images_batch, batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise UserError(f"the loss is not finite at epoch {epoch}; the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item() * len(rows)
        seen += len(rows)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    row = {
        "epoch": epoch,
        **{k: v / seen for k, v in sums.items()},
        "lr": schedule.get_last_lr()[0],
        "seconds": round(seconds, 3),
        "images_per_second": round(seen / seconds, 1),
    }
    if epoch % max(1, epochs // 10) == 0 or epoch == epochs:  # about ten lines per run, however short its epochs
        tqdm.write(f"epoch {epoch}: " + "  ".join(f"{k} {row[k]:.5f}" for k in sums))
    return row


def checkpoint_epochs(out_dir: Path) -> list[int]:
    """The epochs with a committed checkpoint in `out_dir` (none when it does not exist), in order."""
    return sorted(int(m.group(1)) for p in out_dir.glob("epoch-*.state.pt") if (m := CHECKPOINT.search(p.name)))


def _save_checkpoint(out_dir: Path, epoch: int, spec, distiller, optimizer, schedule, log_rows) -> None:
    """Weights (safetensors), then the state file that commits them; keeps the two latest epochs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"epoch-{epoch:03d}.safetensors"
    state = out_dir / f"epoch-{epoch:03d}.state.pt"
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in distiller.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    torch.save(
        {
            "epoch": epoch,
            "spec": spec,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "log": log_rows,
        },
        state.with_suffix(".tmp"),
    )
    state.with_suffix(".tmp").replace(state)
    for old in checkpoint_epochs(out_dir)[:-2]:
        for path in (out_dir / f"epoch-{old:03d}.safetensors", out_dir / f"epoch-{old:03d}.state.pt"):
            path.unlink(missing_ok=True)


def _start_or_resume(out_dir: Path, resume: bool, spec, distiller, optimizer, schedule) -> tuple[list, int]:
    """Fresh start (refusing to clobber a run), or the state after the latest committed epoch."""
    done = checkpoint_epochs(out_dir)
    if not resume:
        if done:
            raise UserError(f"{out_dir} already holds a distill run (epoch {done[-1]}); pass --resume or another --out")
        return [], 1
    if not done:
        raise UserError(f"--resume: {out_dir} holds no checkpoint")
    epoch = done[-1]
    state = torch.load(out_dir / f"epoch-{epoch:03d}.state.pt", map_location="cpu", weights_only=True)
    changed = [k for k in spec if k != "kdpipe_version" and state["spec"].get(k) != spec[k]]
    if changed:
        k = changed[0]
        raise UserError(
            f"--resume: the checkpoint in {out_dir} was made with {k} = {state['spec'].get(k)!r}, not {spec[k]!r}"
        )
    weights = load_file(str(out_dir / f"epoch-{epoch:03d}.safetensors"))
    distiller.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    return list(state["log"]), epoch + 1
