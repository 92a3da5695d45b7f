"""`kdpipe distill`: train a student backbone against cached teacher features, with feature losses only.

Per epoch the cached targets decide the sample order (`cache.reader.CachedTargets`), the matching images are
loaded by row, the method returns its named losses and AdamW + OneCycle step once per batch. Each epoch ends
with a checkpoint (safetensors weights, then optimizer/schedule state), so `--resume` continues an interrupted
run and reproduces the uninterrupted one exactly: the order of epoch e depends only on (seed, e).
"""

from __future__ import annotations

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
from .datasets import SplitData
from .errors import UserError
from .methods import create_method
from .extract import load_teacher
from .models import create_model, file_sha256, save_checkpoint
from .provenance import load_matching_split, open_complete_store
from .recipe import adamw_onecycle, make_loader
from .runtime import resolve_device, seed_everything, write_csv, write_json
from .taps import Tap, TapRecorder, list_taps

STUDENT_FILE = "student.safetensors"
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
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 0.01,
    cache_memory_gb: float = 4.0,
    online_teacher: bool = False,
    teacher_checkpoint: str | None = None,
    seed: int = 0,
    device: str = "auto",
    workers: int = 0,
    resume: bool = False,
) -> dict[str, Any]:
    """Distills `student` from the store's train split into `out`; returns the summary written to distill.json."""
    dev = resolve_device(device)
    feature_store, part = open_complete_store(store)
    data = load_matching_split(feature_store, "train", dataset, data_root)
    teacher_taps = _teacher_taps(feature_store, part, teacher_layers)
    seed_everything(seed)
    net = create_model(student, data.num_classes, input_size=data.preprocessing.input_size, model_kwargs=model_kwargs)
    student_taps = _student_taps(net, data.preprocessing.input_size, student_layers, len(teacher_taps))
    distiller = create_method(method, student=net, student_taps=student_taps, teacher_taps=teacher_taps).to(dev)
    teacher = None
    if online_teacher:
        teacher = OnlineTeacher.from_store(
            feature_store,
            [t.name for t in teacher_taps],
            teacher_checkpoint,
            data.num_classes,
            data.preprocessing.input_size,
        ).to(dev)
    steps = part.num_samples // batch_size
    if steps == 0:
        raise UserError(f"--batch-size {batch_size} exceeds the {part.num_samples} cached samples")
    optimizer, schedule = adamw_onecycle(distiller.parameters(), lr, weight_decay, epochs, steps)
    spec = {
        "kdpipe_version": __version__,
        "method": method,
        "model": student,
        "model_kwargs": model_kwargs or {},
        "num_classes": data.num_classes,
        "input_size": data.preprocessing.input_size,
        "dataset": data.name,
        "store": str(feature_store.path),
        "store_config_hash": feature_store.meta["config_hash"],
        "student_taps": [t.name for t in student_taps],
        "teacher_taps": [t.name for t in teacher_taps],
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "online_teacher": online_teacher,
    }
    out_dir = Path(out)
    log_rows, first_epoch = _start_or_resume(out_dir, resume, spec, distiller, optimizer, schedule)
    # Online, the cache supplies only the sample order; the teacher supplies the targets.
    targets = CachedTargets(part, [] if teacher else spec["teacher_taps"], int(cache_memory_gb * 2**30))
    images = RowImages(data, part.array("indices")[:])
    start = time.perf_counter()
    for epoch in range(first_epoch, epochs + 1):
        row = _train_epoch(
            distiller, optimizer, schedule, targets, teacher, images, epoch, epochs, batch_size, seed, dev, workers
        )
        log_rows.append(row)
        _save_checkpoint(out_dir, epoch, spec, distiller, optimizer, schedule, log_rows)
        write_csv(out_dir / "distill_log.csv", log_rows)
    save_checkpoint(net, out_dir / STUDENT_FILE, spec)
    summary = {
        "stage": "distill",
        **spec,
        "pairs": [
            {"student": s.name, "student_shape": list(s.shape), "teacher": t.name, "teacher_shape": list(t.shape)}
            for s, t in zip(student_taps, teacher_taps)
        ],
        "final": log_rows[-1],
        "targets": "online teacher" if teacher else "cache in RAM" if targets.in_memory else "cache streamed",
        "device": str(dev),
        "seconds_this_run": round(time.perf_counter() - start, 2),
        "weights": str(out_dir / STUDENT_FILE),
    }
    write_json(out_dir / "distill.json", summary)
    return summary


def _teacher_taps(store: FeatureStore, part: SplitStore, requested: tuple[str, ...]) -> list[Tap]:
    """The requested teacher taps, or the store's top-k picks from `kdpipe score`, in depth order."""
    recorded = {t["name"]: Tap(t["index"], t["name"], tuple(t["shape"])) for t in store.meta["identity"]["taps"]}
    names = list(requested)
    if not names:
        scores = part.group.attrs.get("scores")
        if not scores:
            raise UserError(f"{store.path} has no scores; run `kdpipe score` first or pass --teacher-layers")
        names = scores["selected"]
    unknown = [n for n in names if n not in recorded]
    if unknown:
        raise UserError(f"teacher tap {unknown[0]!r} is not in {store.path}; it holds {', '.join(recorded)}")
    return sorted((recorded[n] for n in names), key=lambda t: t.index)


def default_student_taps(taps: list[Tap], stage_ends: list[str], k: int) -> list[Tap]:
    """k taps spread evenly over the student's depth, ending at its last stage end.

    Candidates are the stage ends (`feature_info` modules) when there are at least k of them, else every block
    tap; the first tap (stem or patch embedding) and vectors are never candidates.
    """
    blocks = [t for t in taps[1:] if t.kind != "vector"]
    ends = [t for t in blocks if t.name in stage_ends]
    candidates = ends if len(ends) >= k else blocks
    if len(candidates) < k:
        raise UserError(f"the student has only {len(candidates)} taps for {k} teacher taps; pass --student-layers")
    return [candidates[round((i + 1) * len(candidates) / k) - 1] for i in range(k)]


def _student_taps(net: torch.nn.Module, input_size: int, requested: tuple[str, ...], k: int) -> list[Tap]:
    if requested:
        taps = list_taps(net, input_size, names=list(requested))
        if len(taps) != k:
            raise UserError(f"{len(taps)} student taps for {k} teacher taps; they pair one-to-one in depth order")
        return taps
    stage_ends = [info["module"] for info in getattr(net, "feature_info", []) if isinstance(info, dict)]
    return default_student_taps(list_taps(net, input_size), stage_ends, k)


def _train_epoch(
    distiller,
    optimizer,
    schedule,
    targets: CachedTargets,
    teacher: OnlineTeacher | None,
    images: RowImages,
    epoch: int,
    epochs: int,
    batch_size: int,
    seed: int,
    dev: torch.device,
    workers: int,
) -> dict[str, Any]:
    distiller.train()
    windows = targets.epoch_order(np.random.default_rng([seed, epoch]))
    order = np.concatenate(windows)
    row_batches = order[: len(order) - len(order) % batch_size].reshape(-1, batch_size).tolist()
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
    for (batch, rows), (target_rows, target_values) in bar:
        if not np.array_equal(rows.numpy(), target_rows):
            raise RuntimeError("images and cached targets went out of step")
        batch = batch.to(dev)
        values = teacher(batch) if teacher else [torch.from_numpy(v).to(dev) for v in target_values]
        _, losses = distiller(batch, values)
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
    tqdm.write(f"epoch {epoch}: " + "  ".join(f"{k} {v:.5f}" for k, v in row.items() if k.endswith(("mse", "loss"))))
    return row


def _checkpoints(out_dir: Path) -> list[int]:
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
    for old in _checkpoints(out_dir)[:-2]:
        for path in (out_dir / f"epoch-{old:03d}.safetensors", out_dir / f"epoch-{old:03d}.state.pt"):
            path.unlink(missing_ok=True)


def _start_or_resume(out_dir: Path, resume: bool, spec, distiller, optimizer, schedule) -> tuple[list, int]:
    """Fresh start (refusing to clobber a run), or the state after the latest committed epoch."""
    done = _checkpoints(out_dir) if out_dir.is_dir() else []
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
