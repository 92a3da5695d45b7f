"""Weights in and out: model checkpoints with their spec in the header, and a distill run's epoch checkpoints.

Nothing pickled is ever executed: weights are safetensors, or torch files read with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import UserError, first_line
from .layout import checkpoint_epochs, epoch_state, epoch_weights
from .runtime import first_difference

SPEC_KEY = "kdpipe_model_spec"  # the safetensors header entry holding the model spec
KEPT_CHECKPOINTS = 2


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(model: nn.Module, path: str | Path, model_spec: dict[str, Any]) -> None:
    """Weights as safetensors; `model_spec` (name, num_classes, ...) goes in the header so a loader can check it."""
    save_file(_cpu_state(model), str(path), metadata={SPEC_KEY: json.dumps(model_spec, sort_keys=True)})


def read_model_spec(path: str | Path) -> dict[str, Any] | None:
    """The model spec that `save_checkpoint` wrote, or None for checkpoints made elsewhere."""
    if Path(path).suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            spec = (f.metadata() or {}).get(SPEC_KEY)
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from err
    return json.loads(spec) if spec else None


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads weights strictly: a missing file, unreadable file or any key/shape mismatch is a UserError.

    Accepts safetensors, or a torch file read with `weights_only=True` (a plain state dict, or one under
    `state_dict` / `model`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as err:  # a pickled model, a renamed file, junk: whatever torch.load meets, one line
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from err
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds no state dict")
    _check_state_matches(model, state, path)
    model.load_state_dict(state, strict=True)


def _check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
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
        raise UserError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def save_epoch(out_dir: Path, epoch: int, spec: dict, module: nn.Module, optimizer, schedule, log: list) -> None:
    """Weights (safetensors), then the state file that commits them; keeps the latest KEPT_CHECKPOINTS epochs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, state = epoch_weights(out_dir, epoch), epoch_state(out_dir, epoch)
    tmp = weights.with_suffix(".tmp")
    save_file(_cpu_state(module), str(tmp))
    tmp.replace(weights)
    contents = {
        "epoch": epoch,
        "spec": spec,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "log": log,
    }
    torch.save(contents, state.with_suffix(".tmp"))
    state.with_suffix(".tmp").replace(state)
    for old in checkpoint_epochs(out_dir)[:-KEPT_CHECKPOINTS]:
        for path in (epoch_weights(out_dir, old), epoch_state(out_dir, old)):
            path.unlink(missing_ok=True)


def start_or_resume(
    out_dir: Path, resume: bool, spec: dict, module: nn.Module, optimizer, schedule
) -> tuple[list, int]:
    """(log so far, first epoch to run): a fresh start (refusing to clobber a run), or the state after the latest
    committed epoch, whose spec must equal `spec` (every key but the version)."""
    done = checkpoint_epochs(out_dir)
    if not resume:
        if done:
            raise UserError(f"{out_dir} already holds a distill run (epoch {done[-1]}); pass --resume or another --out")
        return [], 1
    if not done:
        raise UserError(f"--resume: {out_dir} holds no checkpoint")
    epoch = done[-1]
    state = torch.load(epoch_state(out_dir, epoch), map_location="cpu", weights_only=True)
    compared = [k for k in spec if k != "kdpipe_version"]
    where, was, now = first_difference({k: state["spec"].get(k) for k in compared}, {k: spec[k] for k in compared})
    if where:
        raise UserError(f"--resume: the checkpoint in {out_dir} was made with {where} = {was!r}, not {now!r}")
    module.load_state_dict(load_file(str(epoch_weights(out_dir, epoch))), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    return list(state["log"]), epoch + 1
