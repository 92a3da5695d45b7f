"""`kdpipe teach`: train a teacher with cross entropy, for users without a pretrained one (nothing downloads here).

Writes `model.safetensors` (the model spec, preprocessing included, in its header), `teach_log.csv` (per epoch) and
`teach.json`. The model is checked on one small batch (input size, logits shape) before training starts, and the
resolved options are written before the first epoch, so an output folder that cannot be written fails at once.
Epoch checkpoints are written as distill's are (`--checkpoint-seconds`, `pipeline.engine.checkpoints`), the loader's
shuffling generator with them, so `--resume` continues an interrupted run and ends with the same weights.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from torch import nn

from cache.location import location
from cache.lock import lock_output

from ..config import TeachConfig
from ..data.datasets import held_out_split, load_split
from ..engine.checkpoints import RunState, discard_run, resumable, save_checkpoint, start_or_resume, train_epochs
from ..engine.precision import Precision
from ..engine.recipe import adamw_onecycle, evaluate_top1, make_loader
from ..engine.runtime import progress, resolve_device, seed_everything, write_args, write_json
from ..engine.training import optimizer_step
from ..errors import UserError
from ..layout import TEACH_LOG, TEACH_SUMMARY, TEACHER_WEIGHTS, folder_lock
from ..models.spec import ModelSpec
from ..models.taps import dry_forward
from ..models.zoo import create_model, served_preprocessing
from ..version import __version__

log = logging.getLogger(__name__)


def teach(config: TeachConfig) -> dict[str, Any]:
    """Trains the teacher on the train split, evaluating every epoch on the held-out split; returns the summary."""
    out_dir = location(config.out)  # local: the option refuses object storage
    if (out_dir / TEACHER_WEIGHTS).exists() and not (config.overwrite or config.resume):
        raise UserError(f"{out_dir / TEACHER_WEIGHTS} exists (stores may record it); pass --overwrite or another --out")
    dev = resolve_device(config.device)
    generator = seed_everything(config.seed)
    where = (config.data_root, config.input_size, config.download)
    train = load_split(config.dataset, "train", *where)
    held_out = load_split(config.dataset, held_out_split(config.dataset), *where)
    train.check_classes()
    if len(train) < config.batch_size:
        raise UserError(f"--batch-size={config.batch_size} exceeds the {len(train)} training samples")
    input_size = train.preprocessing.input_size
    model = create_model(config.teacher, train.num_classes, input_size=input_size, model_kwargs=config.model_kwargs)
    precision = Precision.of(config, dev, training=True)
    precision.model(model)
    dry_forward(model, input_size, num_classes=train.num_classes)  # wrong sizes and outputs fail before training
    preprocessing = served_preprocessing(config.teacher, model, train.preprocessing, config.normalization)
    train, held_out = train.with_preprocessing(preprocessing), held_out.with_preprocessing(preprocessing)
    model_spec = ModelSpec(
        config.teacher,
        train.num_classes,
        input_size,
        config.model_kwargs or {},
        config.dataset,
        preprocessing.to_dict(),
    )
    pin = precision.pin_memory
    train_loader = make_loader(
        train, config.batch_size, config.workers, shuffle=True, generator=generator, drop_last=True, pin_memory=pin
    )
    test_loader = make_loader(held_out, config.batch_size, config.workers, pin_memory=pin)
    epochs = config.epochs
    optimizer, schedule = adamw_onecycle(model.parameters(), config.lr, config.weight_decay, epochs * len(train_loader))
    run = RunState(model, optimizer, schedule, generator, precision.scaler)
    fingerprint = train.fingerprint_record(config.fingerprint)
    spec = {
        "kdpipe_version": __version__,
        **config.run_settings(),
        **precision.record(),
        **model_spec.to_json(),
        "dataset_fingerprint": fingerprint["fingerprint"],
        "dataset_fingerprint_scheme": fingerprint["fingerprint_scheme"],
    }
    with lock_output(out_dir, folder_lock(out_dir), config.command):
        if config.overwrite and not config.resume:
            discard_run(out_dir, out_dir / TEACH_SUMMARY)
        log_rows, first_epoch = start_or_resume(out_dir, config.resume, spec, run, "teach")
        if first_epoch > epochs and (out_dir / TEACH_SUMMARY).is_file():
            return json.loads((out_dir / TEACH_SUMMARY).read_text())  # a finished run: reused, not recomputed
        write_args(out_dir, config)
        start = time.perf_counter()
        with resumable(out_dir):
            train_epochs(
                out_dir,
                run,
                spec,
                log_rows,
                range(first_epoch, epochs + 1),
                lambda epoch: _train_epoch(run, train_loader, test_loader, epoch, epochs, precision),
                out_dir / TEACH_LOG,
                config.checkpoint_seconds,
            )
            save_checkpoint(model, out_dir / TEACHER_WEIGHTS, model_spec)
            summary = {
                "stage": "teach",
                **model_spec.to_json(),
                "checkpoint": str(out_dir / TEACHER_WEIGHTS),
                "test_split": held_out.split,
                "test_top1": log_rows[-1]["test_top1"],
                "train_top1": log_rows[-1]["train_top1"],
                "epochs": epochs,
                "seconds": round(time.perf_counter() - start, 2),
                "seed": config.seed,
                "device": str(dev),
                "dataset_fingerprint": fingerprint["fingerprint"],
                "dataset_fingerprint_scheme": fingerprint["fingerprint_scheme"],
            }
            write_json(out_dir / TEACH_SUMMARY, summary)
        return summary


def _train_epoch(run: RunState, train_loader, test_loader, epoch: int, epochs: int, precision: Precision) -> dict:
    """One epoch of cross entropy, then top-1 on the held-out split; returns the epoch's log row."""
    model, optimizer, schedule = run.module, run.optimizer, run.schedule
    criterion = nn.CrossEntropyLoss()
    model.train()
    loss_sum = correct = seen = 0.0
    bar = progress(train_loader, desc=f"teach {epoch}/{epochs}", unit="batch", leave=False)
    for images, labels in bar:
        images, labels = precision.batch(images), labels.to(precision.device)
        with precision.autocast():
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer_step(loss, epoch, optimizer, schedule, precision)
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    test_top1 = evaluate_top1(model, test_loader, precision)
    log.info("epoch %d: loss %.4f  train %.2f%%  test %.2f%%", epoch, loss_sum / seen, 100 * correct / seen, test_top1)
    return {
        "epoch": epoch,
        "train_loss": loss_sum / seen,
        "train_top1": 100 * correct / seen,
        "test_top1": test_top1,
        "lr": schedule.get_last_lr()[0],
    }
