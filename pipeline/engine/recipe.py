"""The training recipe shared by every stage that trains (docs/method.md §5): loaders, AdamW + OneCycle, top-1."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .precision import Precision


def make_loader(
    dataset: Dataset,
    batch_size: int = 1,
    workers: int = 0,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    batch_sampler: list | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader; worker processes are spawned, never forked (fork deadlocks with Blosc/zarr threads).

    `batch_sampler` (lists of indices) fixes the batches and their order instead of batch_size/shuffle;
    `pin_memory` pins them for non-blocking copies to CUDA (`Precision.pin_memory`).
    """
    common = {
        "num_workers": workers,
        "multiprocessing_context": "spawn" if workers > 0 else None,
        "pin_memory": pin_memory,
    }
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        **common,
    )


def adamw_onecycle(
    params, lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW and a OneCycle schedule over `total_steps` (pct_start 0.3, PyTorch defaults otherwise), stepped per
    batch."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.3)
    return optimizer, schedule


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: DataLoader, precision: Precision) -> float:
    """Top-1 accuracy in percent over every sample of `loader` (no dropped batch), at the run's precision."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with precision.autocast():
            logits = model(precision.batch(images))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)
