"""`kdpipe teach`: train a teacher with cross entropy, for users without a pretrained one (nothing downloads here).

Writes `model.safetensors` (the model spec in its header), `teach_log.csv` (per epoch) and `teach.json`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from .datasets import held_out_split, load_split
from .errors import UserError
from .models import create_model, save_checkpoint
from .recipe import adamw_onecycle, evaluate_top1, make_loader
from .runtime import resolve_device, seed_everything, write_csv, write_json

WEIGHTS_FILE = "model.safetensors"


def teach(
    teacher: str,
    dataset: str,
    out: str,
    data_root: str | None = None,
    input_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    epochs: int = 15,
    batch_size: int = 128,
    lr: float = 0.01,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str = "auto",
    workers: int = 0,
    download: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Trains `teacher` on the train split, evaluates the last epoch on the held-out split; returns the summary."""
    out_dir = Path(out)
    if (out_dir / WEIGHTS_FILE).exists() and not overwrite:
        raise UserError(f"{out_dir / WEIGHTS_FILE} exists (stores may record it); pass --overwrite or another --out")
    dev = resolve_device(device)
    generator = seed_everything(seed)
    train = load_split(dataset, "train", data_root, input_size, download)
    held_out = load_split(dataset, held_out_split(dataset), data_root, input_size, download)
    if len(train) < batch_size:
        raise UserError(f"--batch-size {batch_size} exceeds the {len(train)} training samples")
    model_spec = {
        "model": teacher,
        "num_classes": train.num_classes,
        "input_size": train.preprocessing.input_size,
        "model_kwargs": model_kwargs or {},
        "dataset": dataset,
    }
    model = create_model(
        teacher, train.num_classes, input_size=train.preprocessing.input_size, model_kwargs=model_kwargs
    )
    model.to(dev)
    train_loader = make_loader(train, batch_size, workers, shuffle=True, generator=generator, drop_last=True)
    test_loader = make_loader(held_out, batch_size, workers)
    optimizer, schedule = adamw_onecycle(model.parameters(), lr, weight_decay, epochs * len(train_loader))
    out_dir.mkdir(parents=True, exist_ok=True)
    criterion = nn.CrossEntropyLoss()
    log_rows = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum = correct = seen = 0.0
        bar = tqdm(train_loader, desc=f"teach {epoch}/{epochs}", unit="batch", leave=False)
        for images, labels in bar:
            images, labels = images.to(dev), labels.to(dev)
            logits = model(images)
            loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        test_top1 = evaluate_top1(model, test_loader, dev)
        log_rows.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_top1": 100 * correct / seen,
                "test_top1": test_top1,
                "lr": schedule.get_last_lr()[0],
            }
        )
        tqdm.write(
            f"epoch {epoch}: loss {loss_sum / seen:.4f}  train {100 * correct / seen:.2f}%  test {test_top1:.2f}%"
        )
    seconds = time.perf_counter() - start
    save_checkpoint(model, out_dir / WEIGHTS_FILE, model_spec)
    write_csv(out_dir / "teach_log.csv", log_rows)
    summary = {
        "stage": "teach",
        **model_spec,
        "checkpoint": str(out_dir / WEIGHTS_FILE),
        "test_split": held_out.split,
        "test_top1": log_rows[-1]["test_top1"],
        "train_top1": log_rows[-1]["train_top1"],
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "seed": seed,
        "device": str(dev),
        "dataset_fingerprint": train.fingerprint(),
    }
    write_json(out_dir / "teach.json", summary)
    return summary
