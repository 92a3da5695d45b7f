"""--amp, --channels-last and the CUDA-only speed settings on the CPU: bf16 runs and is recorded where it changes
results, fp16 is refused, an overflow is still caught, and a loss scaler's state survives a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cache.schema import STORE_NAME
from cache.store import FeatureStore
from helpers import STUDENT, assert_one_line_error, interrupted_in_epoch, run_cli, weights
from pipeline import DistillConfig, ExtractConfig, TeachConfig, distill, extract, teach
from pipeline.engine.checkpoints import RunState, save_checkpoint, save_epoch, start_or_resume
from pipeline.engine.precision import Precision
from pipeline.engine.recipe import adamw_onecycle
from pipeline.errors import UserError
from pipeline.layout import TEACH_LOG
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import create_model
from pipeline.stages.recompute import recompute

CPU = torch.device("cpu")
TAPS = ("layer2.2", "layer3.2")


def test_bf16_autocasts_and_channels_last_converts_model_and_batch():
    precision = Precision(CPU, "bf16", channels_last=True)
    conv = precision.model(nn.Conv2d(3, 4, 3))
    images = precision.batch(torch.randn(2, 3, 8, 8))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    with precision.autocast():
        assert conv(images).dtype == torch.bfloat16
    assert conv(images).dtype == torch.float32  # outside the context: float32 again
    assert precision.record() == {"amp": "bf16"} and not precision.pin_memory and precision.scaler is None


def test_defaults_leave_every_pass_as_it_was():
    precision = Precision(CPU, training=True)
    images = torch.randn(2, 3, 8, 8)
    conv = nn.Conv2d(3, 4, 3)
    with precision.autocast():
        out = conv(precision.batch(images))
    assert torch.equal(out, conv(images)) and out.dtype == torch.float32
    assert precision.record() == {} and precision.scaler is None and not precision.pin_memory


def test_cudnn_benchmark_is_left_alone_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Precision(CPU, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is False


def test_fp16_on_the_cpu_is_refused_in_one_line(digits_teacher, tmp_path):
    with pytest.raises(UserError, match="amp='fp16': float16 autocast needs CUDA"):
        Precision(CPU, "fp16")
    result = run_cli(
        "extract", "--checkpoint", digits_teacher["checkpoint"], "--amp", "fp16", "--device", "cpu",
        "--out", tmp_path, expect_ok=False,
    )  # fmt: skip
    assert_one_line_error(result, "--amp fp16", "needs CUDA", "--amp bf16")


def test_a_loss_scaler_s_state_travels_in_the_epoch_checkpoint(tmp_path):
    """fp16 training's GradScaler (CUDA's; the CPU one holds the same state) is saved and restored with the run."""

    def run_state(scale: float) -> RunState:
        module = nn.Linear(2, 2)
        optimizer, schedule = adamw_onecycle(module.parameters(), 0.1, 0.0, 10)
        return RunState(module, optimizer, schedule, scaler=torch.amp.GradScaler("cpu", init_scale=scale))

    saved = run_state(1024.0)
    for _ in range(3):  # scaled steps move the growth tracker; an overflow would halve the scale
        saved.scaler.scale(saved.module(torch.ones(1, 2)).sum()).backward()
        saved.scaler.step(saved.optimizer)
        saved.scaler.update()
    saved.scaler.update(new_scale=37.0)
    save_epoch(tmp_path, 1, {"amp": "fp16"}, saved, [])
    resumed = run_state(1.0)
    start_or_resume(tmp_path, True, {"amp": "fp16"}, resumed, "test")
    assert resumed.scaler.state_dict() == saved.scaler.state_dict() and resumed.scaler.get_scale() == 37.0


@pytest.fixture(scope="module")
def fp32_and_bf16_stores(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("amp")
    common = dict(checkpoint=digits_teacher["checkpoint"], layers=TAPS, max_samples=200, device="cpu")
    extract(ExtractConfig(out=str(out / "fp32"), **common))
    extract(ExtractConfig(out=str(out / "bf16"), amp="bf16", channels_last=True, **common))
    return out / "fp32", out / "bf16"


def test_a_bf16_store_is_close_to_float32_and_records_its_precision(fp32_and_bf16_stores):
    fp32, bf16 = (FeatureStore.open(s / STORE_NAME) for s in fp32_and_bf16_stores)
    assert "amp" not in fp32.meta["identity"] and bf16.meta["identity"]["amp"] == "bf16"
    for tap in TAPS:
        a, b = (s.split("train").feature(tap)[:].astype(np.float32) for s in (fp32, bf16))
        relative = np.abs(a - b).max() / np.abs(a).max()
        assert 0 < relative < 0.05, tap  # bf16 keeps 8 bits of mantissa: different, and close
    assert "bf16 autocast" in run_cli("info", fp32_and_bf16_stores[1]).output
    assert "forward     float32" in run_cli("info", fp32_and_bf16_stores[0]).output


def test_verify_recomputes_a_bf16_store_at_its_precision(fp32_and_bf16_stores):
    """bf16 values are exact in float16 (more mantissa, and these are in range), so the live teacher at the store's
    precision reproduces the cache exactly; at float32 it would not."""
    found = recompute(str(fp32_and_bf16_stores[1]), 16, device="cpu")
    assert {a.array for a in found} == {"features/layer2.2", "features/layer3.2", "logits"}
    assert all(a.min_cosine > 1 - 1e-6 for a in found if a.array != "logits"), found
    assert "every cosine >= 0.999" in run_cli("verify", fp32_and_bf16_stores[1], "--recompute", 16).output


def test_a_store_is_not_resumed_at_another_precision(digits_teacher, fp32_and_bf16_stores):
    result = run_cli(
        "extract", "--checkpoint", digits_teacher["checkpoint"], "--layers", ",".join(TAPS), "--max-samples", 200,
        "--device", "cpu", "--amp", "bf16", "--out", fp32_and_bf16_stores[0], expect_ok=False,
    )  # fmt: skip
    assert_one_line_error(result, "holds a different store", "amp")


def test_an_overflow_under_bf16_is_refused_in_one_line(tmp_path):
    """bf16 has float32's range, so a huge activation reaches the float16 store, whose check refuses it."""
    torch.manual_seed(0)
    model = create_model("resnet8", 10, model_kwargs={"base_width": 4})
    with torch.no_grad():
        model.stem[0].weight.mul_(1e6)
    checkpoint = tmp_path / "huge.safetensors"
    save_checkpoint(model, checkpoint, ModelSpec("resnet8", 10))
    result = run_cli(
        "extract", "--teacher", "resnet8", "--model-kwargs", "{base_width: 4}", "--checkpoint", checkpoint,
        "--max-samples", 64, "--amp", "bf16", "--device", "cpu", "--out", tmp_path / "out", expect_ok=False,
    )  # fmt: skip
    assert_one_line_error(result, "is not finite in float16", "|x| > 65504")


BF16_RUN = {**STUDENT, "teacher_layers": TAPS, "amp": "bf16", "channels_last": True, "checkpoint_seconds": 0.0}


def test_distill_under_bf16_records_it_and_resumes_only_at_it(fp32_and_bf16_stores, tmp_path):
    # channels-first: CPU training in channels-last is slow (P12); the slow test below covers it
    store, args = str(fp32_and_bf16_stores[1]), {**BF16_RUN, "epochs": 1, "channels_last": False}
    summary = distill(DistillConfig(store=store, out=str(tmp_path / "bf16"), **args))
    assert summary["amp"] == "bf16" and np.isfinite(summary["final"]["feature_mse"])
    with pytest.raises(UserError, match="made with amp = 'bf16', not its default"):
        distill(DistillConfig(store=store, out=str(tmp_path / "bf16"), resume=True, **{**args, "amp": "off"}))
    fp32 = distill(DistillConfig(store=store, out=str(tmp_path / "fp32"), **{**args, "amp": "off"}))
    assert "amp" not in fp32  # a float32 run's spec is what it always was
    bf16 = weights(tmp_path / "bf16")
    assert any(not torch.equal(bf16[k], v) for k, v in weights(tmp_path / "fp32").items())


@pytest.mark.slow  # CI only: three distill runs
def test_distill_under_bf16_resumes_exactly(fp32_and_bf16_stores, tmp_path, monkeypatch):
    store = str(fp32_and_bf16_stores[1])
    distill(DistillConfig(store=store, out=str(tmp_path / "whole"), **BF16_RUN))
    with interrupted_in_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(store=store, out=str(tmp_path / "cut"), **BF16_RUN))
    distill(DistillConfig(store=store, out=str(tmp_path / "cut"), resume=True, **BF16_RUN))
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.slow  # CI only: a teacher run
def test_teach_under_bf16_records_it_and_resumes_only_at_it(tmp_path):
    args = dict(teacher="resnet8", model_kwargs={"base_width": 4}, epochs=1, batch_size=128, device="cpu")
    teach(TeachConfig(out=str(tmp_path / "t"), amp="bf16", channels_last=True, **args))
    losses = [float(row.split(",")[1]) for row in (tmp_path / "t" / TEACH_LOG).read_text().splitlines()[1:]]
    assert np.isfinite(losses).all()
    with pytest.raises(UserError, match="made with amp = 'bf16', not its default"):
        teach(TeachConfig(out=str(tmp_path / "t"), resume=True, **{**args, "epochs": 2}))
