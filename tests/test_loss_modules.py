"""A loss term that owns trainable state, registered here in one file: its parameter is optimised, its parameter and
buffer are checkpointed with the student, a killed run resumes to the uninterrupted run's bytes, and DDP averages
its gradient and broadcasts its buffer like the student's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from helpers import interrupted_in_epoch
from pipeline import DistillConfig, distill
from pipeline.distillation.losses import LOSSES, STORE_ROWS, TEACHER_FEATURES, FeatureLoss, TermSetup
from pipeline.distillation.methods import Distiller, get_method
from pipeline.engine.distributed import World
from pipeline.models.taps import Tap, list_taps
from pipeline.models.zoo import create_model

TERM = "gain_mse"
PREFIX = f"losses.{TERM}."
LOSSES_SETTING = {"feature_mse": 0, TERM: 1}  # the feature method with this term in place of its MSE
MAX_ROWS = 512  # more than the test store's 400 rows


class GainMSE(FeatureLoss):
    """Feature MSE of the projected student times a learned gain; counts how often it trained on each store row."""

    inputs = (TEACHER_FEATURES, STORE_ROWS)

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("seen", torch.zeros(MAX_ROWS, dtype=torch.long))

    def forward(self, output, batch):
        if self.training:
            rows = batch[STORE_ROWS]
            self.seen.index_add_(0, rows, torch.ones_like(rows))
        return super().forward(output, batch)

    def criterion(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.gain * student, teacher)


def register_gain_mse() -> None:
    if TERM not in LOSSES:
        LOSSES.register(GainMSE, name=TERM)


@pytest.fixture
def gain_mse(monkeypatch):
    """The term registered for one test, then gone (other tests list the registry)."""
    monkeypatch.setitem(LOSSES._entries, TERM, GainMSE)


def _config(store, out, **settings) -> DistillConfig:
    run = {"student": "resnet8", "model_kwargs": {"base_width": 8}, "batch_size": 100, "checkpoint_seconds": 0.0}
    return DistillConfig(store=str(store), out=str(out), device="cpu", losses=LOSSES_SETTING, **run, **settings)


def _epoch_weights(out) -> dict[str, torch.Tensor]:
    return load_file(sorted(out.glob("epoch-*.safetensors"))[-1])


def test_the_terms_parameter_trains_and_its_state_is_checkpointed(gain_mse, scored_store, tmp_path):
    summary = distill(_config(scored_store, tmp_path / "run", epochs=3))
    saved = _epoch_weights(tmp_path / "run")
    assert summary["losses"] == {TERM: {"weight": 1}} and TERM in summary["final"]
    assert saved[PREFIX + "gain"].item() != 0.5  # the optimizer moved it
    assert any(k.startswith(PREFIX + "pairs.") for k in saved)  # its projectors, built on the run's taps
    # 4 batches of 100 per epoch cover the store's 400 rows once: every row trained on in each of the 3 epochs
    assert saved[PREFIX + "seen"].tolist() == [3] * 400 + [0] * (MAX_ROWS - 400)
    student = load_file(tmp_path / "run" / "student.safetensors")
    assert not any(k.startswith("losses.") for k in student)  # the student's weights are the student's alone


def test_a_killed_run_resumes_the_terms_state_byte_for_byte(gain_mse, scored_store, tmp_path, monkeypatch):
    distill(_config(scored_store, tmp_path / "whole", epochs=3))
    with interrupted_in_epoch(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        distill(_config(scored_store, tmp_path / "cut", epochs=3))
    assert _epoch_weights(tmp_path / "cut")[PREFIX + "seen"].tolist()[:400] == [2] * 400
    distill(_config(scored_store, tmp_path / "cut", epochs=3, resume=True))
    whole, cut = (sorted((tmp_path / run).glob("epoch-*.safetensors"))[-1] for run in ("whole", "cut"))
    assert whole.name == cut.name and whole.read_bytes() == cut.read_bytes()


def _distiller(seed: int) -> Distiller:
    torch.manual_seed(seed)
    net = create_model("resnet8", 10, model_kwargs={"base_width": 8})
    setup = TermSetup(list_taps(net, 32, names=["layer2.0"]), [Tap(0, "t", (32, 8, 8))])
    method = get_method("feature").configured({name: {"weight": w} for name, w in LOSSES_SETTING.items()})
    return Distiller(net, method, setup)


def _ddp_rank(rank: int, init_file: str) -> None:
    """One of two ranks: DDP must average the term's gradient over the ranks and broadcast its buffer from rank 0."""
    register_gain_mse()  # a spawned process imports this file afresh
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        distiller = _distiller(seed=0)
        gain = distiller.losses[TERM].gain
        distiller.losses[TERM].seen.fill_(rank + 7)  # rank 1's differs until DDP broadcasts rank 0's
        alone = _distiller(seed=0)  # the same weights, never wrapped
        model = World(rank, 2).parallel(distiller)
        assert distiller.losses[TERM].seen.eq(7).all()
        g = torch.Generator().manual_seed(rank)
        images, batch = torch.randn(4, 3, 32, 32, generator=g), {"features/t": torch.randn(4, 32, 8, 8, generator=g)}
        batch[STORE_ROWS] = torch.arange(4) + 4 * rank
        sum(model(images, batch)[1].values()).backward()
        sum(alone(images, batch)[1].values()).backward()
        mean = alone.losses[TERM].gain.grad.clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(gain.grad, mean / 2)
        assert gain.grad != alone.losses[TERM].gain.grad  # the ranks' batches differ: averaging changed it
    finally:
        dist.destroy_process_group()


@pytest.mark.processes
def test_ddp_averages_the_terms_gradient_and_broadcasts_its_buffer(tmp_path):
    mp.spawn(_ddp_rank, args=(str(tmp_path / "rendezvous"),), nprocs=2)


def test_an_older_checkpoint_moves_its_projectors_to_the_term_that_owns_them(caplog):
    """Epoch checkpoints written before the terms owned their parts held the projectors as the distiller's
    `pairs.<i>.`; a run resumed from one loads them into its feature term."""
    net = create_model("resnet8", 10, model_kwargs={"base_width": 8})
    setup = TermSetup(list_taps(net, 32, names=["layer2.0"]), [Tap(0, "t", (32, 8, 8))])
    built = Distiller(net, get_method("feature"), setup)
    state = built.state_dict()
    older = {k.replace("losses.feature_mse.pairs.", "pairs."): v for k, v in state.items()}
    assert older.keys() != state.keys()
    fresh = Distiller(create_model("resnet8", 10, model_kwargs={"base_width": 8}), get_method("feature"), setup)
    fresh.load_state_dict(older, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    assert "its pairs.* weights now belong to the feature_mse term" in caplog.text
