"""Weights in and out: model checkpoints with their spec in the header, and the epoch checkpoints of a teach or
distill run.

Nothing pickled is ever executed: weights are safetensors, or torch files read with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import pickle
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, safe_open, save
from torch import nn

from cache.errors import StoreError
from cache.location import is_remote, location

from ..errors import UserError, first_line, user_message, writing
from ..layout import checkpoint_epochs, epoch_state, epoch_weights
from ..models.spec import ModelSpec
from .runtime import first_difference, write_bytes, write_csv

log = logging.getLogger(__name__)

SPEC_KEY = "kdpipe_model_spec"  # the safetensors header entry holding the model spec
KEPT_CHECKPOINTS = 2
DEFAULT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # the entries timm's load_state_dict tries
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel and torch.compile, as timm's clean_state_dict
ALLOWED_GLOBALS = [argparse.Namespace]  # what weights_only=True also reads: the args timm's train.py saves


@dataclass(frozen=True)
class LoadedWeights:
    """What `load_checkpoint` did: the entry the state dict came from (None: the file is one), the wrapper
    prefixes it stripped, and whether the checkpoint's head was "loaded" or "dropped" (another class count)."""

    key: str | None
    stripped: tuple[str, ...] = ()
    head: str = "loaded"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(model: nn.Module, path: str | Path, model_spec: ModelSpec) -> None:
    """Weights as safetensors, written whole or not at all; `model_spec` goes in the header so a loader can check
    it and rebuild the model."""
    header = json.dumps(model_spec.to_json(), sort_keys=True)
    write_bytes(path, save(_cpu_state(model), metadata={SPEC_KEY: header}))


def read_model_spec(path: str | Path) -> ModelSpec | None:
    """The model spec that `save_checkpoint` wrote, or None for checkpoints made elsewhere."""
    path = location(path)
    if path.suffix != ".safetensors":
        return None
    try:
        if is_remote(path):
            spec = _remote_safetensors_metadata(path).get(SPEC_KEY)
        else:
            with safe_open(str(path), framework="pt") as f:
                spec = (f.metadata() or {}).get(SPEC_KEY)
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read checkpoint {path} as safetensors: {first_line(err)}") from err
    if not spec:
        return None
    try:
        return ModelSpec.from_json(json.loads(spec))
    except (ValueError, KeyError, TypeError) as err:  # not JSON, or not the fields kdpipe writes
        raise UserError(f"checkpoint {path}: its {SPEC_KEY} header is not a kdpipe model spec ({err})") from None


def _remote_safetensors_metadata(path) -> dict[str, str]:
    """A safetensors file's metadata on object storage, from its header alone (8 bytes of length, then JSON)."""
    length = int.from_bytes(path.fs.cat_file(path.path, start=0, end=8), "little")
    try:
        header = json.loads(path.fs.cat_file(path.path, start=8, end=8 + length))
    except ValueError as err:
        raise SafetensorError(f"invalid header: {err}") from None
    return header.get("__metadata__") or {}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, from a local file or an object."""
    return load(path.read_bytes()) if is_remote(path) else load_file(str(path))


def file_or_bytes(path):
    """What `torch.load` or `np.load` reads: a local path as it is, an object as its bytes."""
    return io.BytesIO(path.read_bytes()) if is_remote(path) else path


def load_checkpoint(
    model: nn.Module, path: str | Path, key: str | None = None, num_classes: int | None = None
) -> LoadedWeights:
    """Loads weights as timm's `load_checkpoint` does, but strictly: a missing or unreadable file, an absent `key`
    or any key/shape mismatch is a UserError.

    The file is safetensors, or a torch file read with `weights_only=True` (argparse.Namespace allowed, for the `args`
    of timm's train.py). Its state dict is the entry `key`, else the first of DEFAULT_KEYS that holds one, else the
    file itself; DDP and torch.compile prefixes are stripped. With `num_classes`, a classifier head of another class
    count is dropped and the model keeps its fresh one (see `load_state`).
    """
    path = location(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    contents = _read_weights(path)
    key, state = _state_dict_entry(contents, key, path)
    state, stripped = _strip_wrappers(state)
    head = load_state(model, state, f"checkpoint {path}", num_classes)
    return LoadedWeights(key, stripped, head)


def _read_weights(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path)
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read checkpoint {path} as safetensors: {first_line(err)}") from err
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(file_or_bytes(path), map_location="cpu", weights_only=True)
    except Exception as err:  # whatever torch.load meets (pickled objects, junk, a cut-off file): one line
        refused = refused_global(path) if isinstance(err, pickle.UnpicklingError) else None
        if refused:
            raise UserError(
                f"cannot read checkpoint {path}: a torch file of pickled objects ({refused}) that weights_only=True "
                "refuses, such as a whole model from torch.save(model); save its state_dict() instead"
            ) from err
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format since torch 1.6
        reason = (
            "its zip archive is damaged or truncated" if zipped else "not a file torch.save wrote (junk or truncated)"
        )
        raise UserError(f"cannot read checkpoint {path} as a torch file: {reason}") from err


def refused_global(path: Path, shown: int = 3) -> str | None:
    """The pickled globals of the torch file at `path` that torch.load(weights_only=True) refuses (the first `shown`
    by name, and how many there are), as torch's own scan of the file finds them, not as its error message words
    them; None when there are none or the file cannot be scanned."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    try:
        found = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(file_or_bytes(path))) - allowed)
    except Exception:  # a file too damaged to scan: it fails as damaged, not as refused
        return None
    more = f", ... ({len(found)} in all)" if len(found) > shown else ""
    return ", ".join(found[:shown]) + more if found else None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _state_dict_entry(contents: Any, key: str | None, path: Path) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(entry used, state dict): `key`, else the first of DEFAULT_KEYS holding a state dict, else the file (None)."""
    if not isinstance(contents, dict):
        raise UserError(f"checkpoint {path} holds a {type(contents).__name__}, not a state dict")
    if key is not None:
        if key not in contents:
            raise UserError(f"checkpoint {path} has no entry {key!r}; it holds {_listing(contents)}")
        if not _is_state_dict(contents[key]):
            raise UserError(f"entry {key!r} of checkpoint {path} is not a state dict of tensors")
        return key, contents[key]
    key = next((k for k in DEFAULT_KEYS if _is_state_dict(contents.get(k))), None)
    if key is not None:
        return key, contents[key]
    if not _is_state_dict(contents):
        raise UserError(
            f"checkpoint {path} holds no state dict: none of {', '.join(DEFAULT_KEYS)}, nor tensors only; it holds "
            f"{_listing(contents)} (pass --checkpoint-key)"
        )
    return None, contents


def _listing(contents: dict, shown: int = 8) -> str:
    names = [str(k) for k in contents]
    more = f", ... ({len(names)} entries)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _strip_wrappers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The state without wrapper prefixes (in either order, as timm's clean_state_dict), and the prefixes found."""
    cleaned, found = {}, set()
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            prefix = next(p for p in WRAPPER_PREFIXES if key.startswith(p))
            found.add(prefix)
            key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned, tuple(p for p in WRAPPER_PREFIXES if p in found)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, num_classes: int | None = None) -> str:
    """Loads `state` into `model` strictly; returns the head's fate, "loaded" or "dropped".

    With `num_classes` (the dataset's), a classifier head of another class count (an ImageNet head on a 10-class
    set) is dropped and the model keeps its freshly initialised one; every other mismatch names `source`.
    """
    dropped = _other_class_count_head(model, state, num_classes) if num_classes else []
    if dropped:
        log.info(
            "%s has a %d-class head; the dataset has %d classes: keeping the model's fresh head (%s)",
            *(source, state[dropped[0]].shape[0], num_classes, ", ".join(dropped)),
        )
        state = {k: v for k, v in state.items() if k not in dropped}
    _check_state_matches(model, state, source, allowed_missing=dropped)
    model.load_state_dict(state, strict=not dropped)
    return "dropped" if dropped else "loaded"


def classifier_names(model: nn.Module, num_classes: int) -> list[str]:
    """Module paths of the model's classifier: timm's `get_classifier()` (one head, or a tuple of them), else the
    last nn.Linear or 1×1 conv with `num_classes` outputs (torchvision and the built-in models)."""
    modules = dict(model.named_modules())
    if hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        names = [name for name, module in modules.items() if any(module is head for head in heads)]
        if names:
            return names
    outputs = {
        name: module.out_features if isinstance(module, nn.Linear) else module.out_channels
        for name, module in modules.items()
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
    }
    return [name for name, out in outputs.items() if out == num_classes][-1:]


def _other_class_count_head(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> list[str]:
    """The classifier's keys when `state` holds them all with another class count (the same input width), else []."""
    expected = model.state_dict()
    keys = [k for name in classifier_names(model, num_classes) for k in expected if k.startswith(f"{name}.")]
    if not keys or any(k not in state for k in keys):
        return []
    other_count = all(
        state[k].shape[0] != expected[k].shape[0] and state[k].shape[1:] == expected[k].shape[1:] for k in keys
    )
    return keys if other_count else []


def _check_state_matches(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, allowed_missing: Collection[str] = ()
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(
            f"{len(wrong_shape)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})"
        )
    if problems:
        raise UserError(f"{source} does not match the model: " + "; ".join(problems))


@dataclass
class RunState:
    """What an epoch checkpoint holds besides the log: the trained module, its optimizer and schedule, and the
    generator a shuffling loader draws its order from (teach's; distill's order follows from seed and epoch), and
    fp16 training's loss scaler (`pipeline.engine.precision`)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator | None = None
    scaler: torch.amp.GradScaler | None = None


def save_epoch(out_dir: Path, epoch: int, spec: dict, run: RunState, log: list) -> None:
    """Weights (safetensors), then the state file that commits them, each written whole or not at all; keeps the
    latest KEPT_CHECKPOINTS epochs. A failed write leaves the committed epochs as they were."""
    weights, state = epoch_weights(out_dir, epoch), epoch_state(out_dir, epoch)
    contents = {
        "epoch": epoch,
        "spec": spec,
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "generator": run.generator.get_state() if run.generator is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "log": log,
    }
    buffer = io.BytesIO()
    torch.save(contents, buffer)
    write_bytes(weights, save(_cpu_state(run.module)))
    try:
        write_bytes(state, buffer.getvalue())
    except BaseException:
        weights.unlink(missing_ok=True)  # uncommitted: its space back, for the run that resumes
        raise
    for old in checkpoint_epochs(out_dir)[:-KEPT_CHECKPOINTS]:
        for path in (epoch_weights(out_dir, old), epoch_state(out_dir, old)):
            path.unlink(missing_ok=True)


def train_epochs(
    out_dir: Path,
    run: RunState,
    spec: dict,
    log: list,
    epochs: range,
    train_epoch: Callable[[int], dict],
    log_file: Path,
    checkpoint_seconds: float,
    writes: bool = True,
) -> list:
    """The epoch loop of teach and distill: `train_epoch(epoch)` for each of `epochs`, its log row appended to `log`.
    After an epoch, once `checkpoint_seconds` have passed since the last checkpoint, and after the last epoch, the
    epoch checkpoint and `log_file` (CSV) are written by the process that `writes` (rank 0): short epochs are not
    each worth a checkpoint."""
    last_save = time.perf_counter()
    for epoch in epochs:
        log.append(train_epoch(epoch))
        if writes and (epoch == epochs[-1] or time.perf_counter() - last_save >= checkpoint_seconds):
            save_epoch(out_dir, epoch, spec, run, log)
            write_csv(log_file, log)
            last_save = time.perf_counter()
    return log


def start_or_resume(out_dir: Path, resume: bool, spec: dict, run: RunState, stage: str) -> tuple[list, int]:
    """(log so far, first epoch to run): a fresh start (refusing to clobber a `stage` run), or the state after the
    latest committed epoch, whose spec must equal `spec` (every key but the version)."""
    done = checkpoint_epochs(out_dir)
    if not resume:
        if done:
            raise UserError(f"{out_dir} already holds a {stage} run (epoch {done[-1]}); pass --resume or another --out")
        return [], 1
    if not done:
        raise UserError(f"--resume: {out_dir} holds no checkpoint")
    epoch, state, weights = _newest_readable(out_dir, done)
    # a setting recorded only when it is not its default (amp, augmentation) is compared in either direction
    compared = sorted((set(spec) | set(state["spec"])) - {"kdpipe_version"})
    where, was, now = first_difference({k: state["spec"].get(k) for k in compared}, {k: spec.get(k) for k in compared})
    if where:
        raise UserError(
            f"--resume: the checkpoint in {out_dir} was made with {where} = {_setting(was)}, not {_setting(now)}"
        )
    run.module.load_state_dict(weights, strict=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    if run.generator is not None:
        run.generator.set_state(state["generator"])
    if run.scaler is not None:
        run.scaler.load_state_dict(state["scaler"])
    return list(state["log"]), epoch + 1


def _newest_readable(out_dir: Path, epochs: list[int]) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """(epoch, state, weights) of the newest epoch checkpoint whose two files read whole; a damaged, truncated or
    refused newer one is named in a warning and passed over; none readable is one UserError naming them."""
    refused = []
    for epoch in reversed(epochs):
        files = (epoch_state(out_dir, epoch), epoch_weights(out_dir, epoch))
        try:
            state = torch.load(file_or_bytes(files[0]), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"spec", "optimizer", "schedule", "log"} <= state.keys():
                raise ValueError("not an epoch state kdpipe wrote")
            weights = read_safetensors(files[1])
        except Exception as err:  # torch.load and safetensors raise whatever the bytes provoke: one line each
            reason = first_line(err)
            refused.append(f"epoch {epoch} ({reason})")
            log.warning("--resume: the checkpoint of epoch %d in %s is unreadable (%s)", epoch, out_dir, reason)
            continue
        if refused:
            log.warning("--resume: continuing from the checkpoint of epoch %d instead", epoch)
        return epoch, state, weights
    raise UserError(f"--resume: no checkpoint in {out_dir} reads whole: {'; '.join(refused)}")


def discard_run(out_dir: Path, summary: Path) -> None:
    """Removes a run's summary, which marks it finished, and its epoch checkpoints (a run replaced with
    --overwrite), so that no part of it passes for part of the next."""
    with writing(out_dir):
        summary.unlink(missing_ok=True)
        for epoch in checkpoint_epochs(out_dir):
            for path in (epoch_weights(out_dir, epoch), epoch_state(out_dir, epoch)):
                path.unlink(missing_ok=True)


def _setting(value: Any) -> str:
    """A spec value for a message; absent (None) is a setting at its default, which a spec does not record."""
    return "its default" if value is None else repr(value)


@contextlib.contextmanager
def resumable(out_dir: Path) -> Iterator[None]:
    """Around a run's epochs and final writes: a failure the user can fix (a full disk, a non-finite loss, a damaged
    chunk) says which epoch checkpoint in `out_dir` is kept for --resume, or that none exists yet."""
    try:
        yield
    except (UserError, StoreError) as err:
        done = checkpoint_epochs(out_dir)
        kept = (
            f"the checkpoint of epoch {done[-1]} in {out_dir} is kept (--resume continues from it)"
            if done
            else "no checkpoint exists yet (a rerun starts from epoch 1)"
        )
        raise UserError(f"{user_message(err)}; {kept}") from err
