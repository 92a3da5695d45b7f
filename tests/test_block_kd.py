"""Block-KD (docs/method.md §6): stepping stones built by shapes, the teacher's tail cut out of its traced graph, the
frozen teacher, gradients per stone, and the loss against a hand computation."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import assert_one_line_error, interrupted_in_epoch, own_classifier_top1, run_cli
from pipeline import DistillConfig, distill
from pipeline.distillation.losses import BlockKD, FrozenTeacher, TermSetup
from pipeline.distillation.methods import Distiller, get_method
from pipeline.distillation.stones import SteppingStones, stone_weights, teacher_tails
from pipeline.errors import UserError
from pipeline.models.taps import list_taps, stage_ends
from pipeline.models.zoo import create_model


def _stones(teacher_name: str, student_name: str, size: int = 32, connector: str = "conv1x1_bn", **student_kwargs):
    teacher = create_model(teacher_name, 10, input_size=size)
    student = create_model(student_name, 10, input_size=size, model_kwargs=student_kwargs or None)
    t_stages, s_stages = stage_ends(list_taps(teacher, size)), stage_ends(list_taps(student, size))
    n = len(t_stages)
    stones = SteppingStones(teacher, teacher_name, s_stages, t_stages, range(1, n + 1), connector, size)
    return teacher, student, stones


@pytest.mark.parametrize(
    "teacher_name, student_name, kwargs, shapes, pooled",
    [
        # 3 stages: channels only
        ("resnet20", "resnet8", {"base_width": 8}, [(16, 32, 32), (32, 16, 16), (64, 8, 8)], [False] * 3),
        # 4 stages: timm's ResNet-18 reduces 4x in its stem, so every student map is pooled onto the teacher's grid
        ("timm:resnet18", "resnet9", {}, [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)], [True] * 4),
        pytest.param(
            "resnet34_cifar",
            "resnet9",
            {},
            [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
            [False] * 4,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_stones_by_shapes(teacher_name, student_name, kwargs, shapes, pooled):
    teacher, student, stones = _stones(teacher_name, student_name, **kwargs)
    n = len(shapes)
    assert stones.stones == list(range(1, n + 1)) and stones.weights == [0.5 ** (n - i) for i in range(1, n + 1)]
    images = torch.randn(2, 3, 32, 32)
    student.eval()
    outputs = {}
    hooks = [
        dict(student.named_modules())[tap].register_forward_hook(lambda m, a, o, tap=tap: outputs.__setitem__(tap, o))
        for tap in stones.student_taps
    ]
    student(images)
    for hook in hooks:
        hook.remove()
    for connector, shape, pools in zip(stones.connectors, shapes, pooled, strict=True):
        conv = connector.channel_map[0]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (connector.student.channels, shape[0], (1, 1))
        assert (connector.student.spatial != connector.teacher.spatial) == pools
        assert tuple(connector(outputs[connector.student.name]).shape[1:]) == shape
    assert [tuple(y.shape) for y in stones(outputs)] == [(2, 10)] * n


def test_a_student_grid_smaller_than_the_teachers_is_refused():
    with pytest.raises(UserError, match="smaller than teacher stage tap .* a connector only pools"):
        _stones("resnet9", "timm:resnet18")


class _LongSkip(nn.Module):
    """A stem output added back after stage 2: stage 2's successor depends on more than stage 1's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stage1, self.stage2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x0 = self.stem(x)
        x2 = self.stage2(self.stage1(x0)) + x0
        return self.head(x2.mean((2, 3)))


class _DataDependent(_LongSkip):
    def forward(self, x):
        x = self.stage1(self.stem(x))
        return self.head((x if x.sum() > 0 else -x).mean((2, 3)))


def test_a_tail_that_reads_before_its_stage_is_refused():
    with pytest.raises(UserError, match="after stage1 also read the output of stem, computed before stage1"):
        teacher_tails(_LongSkip(), ["stage1"], "long-skip")
    assert len(teacher_tails(_LongSkip(), ["stage2"], "long-skip")) == 1  # after stage 2 the skip has joined
    with pytest.raises(UserError, match="cannot be traced by torch.fx"):
        teacher_tails(_DataDependent(), ["stage1"], "data-dependent")


@pytest.mark.parametrize(
    "teacher_name, size",
    [("resnet20", 32), ("timm:vit_tiny_patch16_224", 32), pytest.param("tv:mobilenet_v2", 32, marks=pytest.mark.slow)],
)
def test_the_tail_of_the_teachers_own_stage_output_gives_its_logits_without_running_earlier_stages(teacher_name, size):
    teacher = create_model(teacher_name, 10, input_size=size).eval()
    stages = [t.name for t in stage_ends(list_taps(teacher, size))]
    modules = dict(teacher.named_modules())
    images = torch.randn(2, 3, size, size)
    outputs, calls = {}, []
    for name in stages:
        modules[name].register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o))
    with torch.no_grad():
        logits = teacher(images)
        for name, tail in zip(stages, teacher_tails(teacher, stages, teacher_name), strict=True):
            handles = [modules[s].register_forward_hook(lambda *a, s=s: calls.append(s)) for s in stages]
            torch.testing.assert_close(tail(outputs[name]), logits, rtol=1e-4, atol=1e-5)
            for handle in handles:
                handle.remove()
            assert calls == stages[stages.index(name) + 1 :]  # the later stage ends ran, no earlier one
            calls.clear()


def _block_distiller(losses: dict | None = None):
    teacher = create_model("resnet20", 10)
    student = create_model("resnet8", 10, model_kwargs={"base_width": 8})
    stages = stage_ends(list_taps(student, 32)), stage_ends(list_taps(teacher, 32))
    setup = TermSetup(teacher=FrozenTeacher("resnet20", teacher, *stages, 32))
    distiller = Distiller(student, get_method("block-kd").configured(losses or {}), setup)
    return teacher, student, distiller


def test_teacher_is_frozen_and_stage_gradients_follow_the_stones():
    teacher, student, distiller = _block_distiller()
    teacher_names = {id(p) for p in teacher.parameters()}
    assert not teacher_names & {id(p) for p in distiller.parameters()}
    assert not any("_tails" in k for k in distiller.state_dict())
    assert any(k.startswith("losses.block_kd.stones.connectors.") for k in distiller.state_dict())
    images = torch.randn(4, 3, 32, 32)
    distiller.train()
    for i in (1, 2, 3):
        distiller.zero_grad(set_to_none=True)
        output, _ = distiller(images, {"labels": torch.tensor([0, 1, 2, 3]), "logits": torch.randn(4, 10)})
        distiller.losses["block_kd"].stones(output.features)[i - 1].sum().backward()
        for stage in (1, 2, 3):
            grads = [p.grad for p in getattr(student, f"layer{stage}").parameters()]
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert reached == (stage <= i), (i, stage)
        assert student.fc.weight.grad is None
        assert all(p.grad is None for p in teacher.parameters())
        assert not teacher.training


def _run_config(store, out, **settings) -> DistillConfig:
    student = {"method": "block-kd", "student": "resnet8", "model_kwargs": {"base_width": 8}, "batch_size": 32}
    return DistillConfig(store=str(store), out=str(out), device="cpu", **{**student, **settings})


def test_a_run_leaves_the_teacher_bit_identical_and_the_stones_out_of_the_student(scored_store, tmp_path, monkeypatch):
    losses_module = importlib.import_module("pipeline.distillation.losses")
    built, original = [], losses_module.SteppingStones

    def keep(teacher, *args):
        built.append((teacher, {k: v.clone() for k, v in teacher.state_dict().items()}))
        return original(teacher, *args)

    monkeypatch.setattr(losses_module, "SteppingStones", keep)
    summary = distill(_run_config(scored_store, tmp_path / "run", steps=6))
    ((teacher, before),) = built
    after = teacher.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert summary["evaluated_with"] == "own classifier"
    assert summary["test_top1"] == pytest.approx(
        own_classifier_top1(tmp_path / "run"), abs=100 / summary["num_test"]
    )  # the student alone, no stone
    assert [s["stage"] for s in summary["stones"]] == [1, 2, 3]
    assert [s["weight"] for s in summary["stones"]] == [0.25, 0.5, 1.0]
    saved = load_file(tmp_path / "run" / "student.safetensors")
    assert set(saved) == set(create_model("resnet8", 10, model_kwargs={"base_width": 8}).state_dict())
    assert {"block_kd.task", "block_kd.distill"} <= set(summary["final"])


def _hand_kd(student, teacher, t):
    total = 0.0
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist(), strict=True):
        p_s = [math.exp(v / t) for v in s_row]
        p_t = [math.exp(v / t) for v in t_row]
        p_s, p_t = [v / sum(p_s) for v in p_s], [v / sum(p_t) for v in p_t]
        total += sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    return t * t * total / len(student)


def _hand_ce(logits, labels):
    rows = logits.double().tolist()
    return sum(math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in zip(rows, labels.tolist(), strict=True)) / len(
        rows
    )


@pytest.mark.parametrize("alpha, beta, gamma, t", [(1.0, 1.0, 0.0, 4.0), (0.5, 2.0, 1.0, 4.0), (1.0, 0.0, 3.0, 2.0)])
def test_two_stage_loss_by_hand(alpha, beta, gamma, t):
    g = torch.Generator().manual_seed(0)
    student, stone1, stone2, teacher = (torch.randn(3, 5, generator=g) * 2 for _ in range(4))
    labels = torch.tensor([0, 4, 2])
    parts = BlockKD(alpha, beta, gamma, t).parts(
        student, [stone1, stone2], stone_weights([1, 2], 2), {"labels": labels, "logits": teacher}
    )
    w1, w2 = 0.5, 1.0  # 1/2^(n-i), n = 2
    task = _hand_ce(student, labels) + w1 * _hand_ce(stone1, labels) + w2 * _hand_ce(stone2, labels)
    kd = _hand_kd(student, teacher, t) + w1 * _hand_kd(stone1, teacher, t) + w2 * _hand_kd(stone2, teacher, t)
    ensemble = (stone1 + stone2) / 2
    cross = sum(_hand_kd(y, ensemble, t) for y in (student, stone1, stone2))
    expected = {"task": alpha * task, "distill": beta * kd, "cross": gamma * cross}
    expected = {k: v for k, v in expected.items() if v}
    assert set(parts) == set(expected)
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5)


def test_the_cross_term_treats_the_ensemble_as_a_target():
    student = torch.randn(3, 5, requires_grad=True)
    stone = torch.randn(3, 5, requires_grad=True)
    BlockKD(0, 0, 1.0).parts(student, [stone], [1.0], {})["cross"].backward()
    # Only the stone's own prediction moves towards the (detached) ensemble: a single stone is its own ensemble.
    assert stone.grad.abs().max() < 1e-6 and student.grad.abs().max() > 0


def test_block_kd_settings_from_yaml_and_their_refusals(scored_store, tmp_path):
    common = ["distill", str(scored_store), "--method", "block-kd", "--student", "resnet8", "--check"]
    common += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    run_cli(*common, "--losses", "{block_kd: {gamma: 1, stones: [2, 3], connector: conv3x3_bn}}")
    for losses, message in [
        ("{block_kd: {stones: [4]}}", "there is no stage 4; the stages are 1..3"),
        ("{block_kd: {stones: [0]}}", "stones must be distinct stage numbers from 1, not [0]"),
        ("{block_kd: {connector: nope}}", "unknown connector 'nope'"),
        ("{block_kd: {alpha: -1}}", "alpha must be >= 0"),
    ]:
        assert_one_line_error(run_cli(*common, "--losses", losses, expect_ok=False), message)
    assert_one_line_error(
        run_cli(*common, "--student", "resnet9", expect_ok=False),
        "teacher resnet20 has 3 stages (layer1.2, layer2.2, layer3.2) and student resnet9 4",
    )
    run_cli(*common, "--student", "resnet9", "--student-layers", "layer1.0,layer2.0,layer3.0")


def test_the_run_records_its_stones(scored_store, tmp_path):
    spec = distill(
        DistillConfig(
            store=str(scored_store),
            method="block-kd",
            student="resnet8",
            losses={"block_kd": {"stones": [3]}},
            out=str(tmp_path / "run"),
            device="cpu",
            check=True,
        )
    )
    assert spec["stones"] == [
        {
            "stage": 3,
            "student": "layer3.0",
            "student_shape": [64, 8, 8],
            "teacher": "layer3.2",
            "teacher_shape": [64, 8, 8],
            "weight": 1.0,
        }
    ]
    assert list(spec["losses"]["block_kd"]["stones"]) == [3]
    json.dumps(spec)


@pytest.mark.slow  # three distill runs; test_distill_probe covers resume in the fast suite
def test_an_interrupted_run_resumes_exactly(scored_store, tmp_path, monkeypatch):
    """The connectors and their optimizer state are checkpointed with the student (the teacher is not)."""
    settings = {"epochs": 3, "batch_size": 100, "checkpoint_seconds": 0.0}
    distill(_run_config(scored_store, tmp_path / "whole", **settings))
    with interrupted_in_epoch(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        distill(_run_config(scored_store, tmp_path / "cut", **settings))
    saved = load_file(next((tmp_path / "cut").glob("epoch-*.safetensors")))
    stones = "losses.block_kd.stones."
    assert any(k.startswith(stones + "connectors.") for k in saved)
    assert not any(k.startswith(stones) and not k.startswith(stones + "connectors.") for k in saved)
    distill(_run_config(scored_store, tmp_path / "cut", resume=True, **settings))
    whole, cut = (load_file(tmp_path / run / "student.safetensors") for run in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
