"""Projector and alignment logic of the feature method, and the default student taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill import default_student_taps
from pipeline.errors import UserError
from pipeline.methods import FeatureDistiller, FeaturePair
from pipeline.models import create_model
from pipeline.taps import Tap, list_taps


def pair(s_shape, t_shape) -> FeaturePair:
    return FeaturePair(Tap(0, "s", tuple(s_shape)), Tap(0, "t", tuple(t_shape)))


@pytest.mark.parametrize(
    "s_shape,t_shape,conv,student_pool,teacher_pool",
    [
        ((64, 8, 8), (256, 8, 8), torch.nn.Conv2d, None, None),  # CNN -> CNN, same size
        ((64, 32, 32), (256, 8, 8), torch.nn.Conv2d, (8, 8), None),  # student larger: student pooled
        ((512, 4, 4), (256, 8, 8), torch.nn.Conv2d, None, (4, 4)),  # teacher larger: teacher pooled
        ((64, 8, 8), (65, 192), torch.nn.Conv1d, None, (64,)),  # CNN student, ViT teacher: 64 vs 65 tokens
        ((128, 4, 4), (64,), torch.nn.Conv2d, (1, 1), None),  # teacher vector = 1x1 map
    ],
)
def test_alignment_rules(s_shape, t_shape, conv, student_pool, teacher_pool):
    p = pair(s_shape, t_shape)
    assert isinstance(p.projector, conv) and p.projector.bias is None
    assert p.student_size == student_pool and p.teacher_size == teacher_pool
    s = torch.randn(2, *s_shape)
    t = torch.randn(2, *t_shape)
    assert p(s, t).dim() == 0


def test_vit_to_vit_projects_per_token():
    p = pair((65, 96), (65, 192))
    assert isinstance(p.projector, torch.nn.Conv1d) and p.projector.weight.shape == (192, 96, 1)
    s, t = torch.randn(3, 65, 96), torch.randn(3, 65, 192)
    expected = F.mse_loss(torch.einsum("od,btd->bot", p.projector.weight[:, :, 0], s), t.transpose(1, 2))
    assert p(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_by_hand_with_identity_projector():
    """Student 4x4 map pooled to the teacher's 2x2, identity projection, plain mean of squared errors."""
    p = pair((2, 4, 4), (2, 2, 2))
    with torch.no_grad():
        p.projector.weight.copy_(torch.eye(2)[:, :, None, None])
    s = torch.arange(32.0).reshape(1, 2, 4, 4)
    t = torch.zeros(1, 2, 2, 2)
    pooled = s.reshape(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 average pooling by hand
    assert p(s, t).item() == pytest.approx((pooled**2).mean().item())


def test_mixed_sizes_are_an_error():
    with pytest.raises(UserError, match="larger in one axis and smaller in the other"):
        pair((64, 16, 4), (64, 8, 8))
    with pytest.raises(UserError, match="pair one-to-one"):
        FeatureDistiller(create_model("resnet8", 10), [Tap(1, "layer1.0", (16, 32, 32))], [])


def test_teacher_targets_are_float16_friendly():
    p = pair((8, 4, 4), (8, 4, 4))
    assert p(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4).half()).dtype == torch.float32


@pytest.mark.parametrize(
    "model,k,expected",
    [
        ("resnet9", 4, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
        ("resnet20", 3, ["layer1.2", "layer2.2", "layer3.2"]),
        ("resnet20", 2, ["layer2.2", "layer3.2"]),
        ("resnet20", 4, ["layer1.1", "layer2.0", "layer3.0", "layer3.2"]),  # more picks than stages: blocks spread
        ("vit_et", 4, ["blocks.1", "blocks.3", "blocks.5", "blocks.7"]),
    ],
)
def test_default_student_taps(model, k, expected):
    net = create_model(model, 10)
    stage_ends = [info["module"] for info in net.feature_info]
    assert [t.name for t in default_student_taps(list_taps(net, 32), stage_ends, k)] == expected


def test_too_few_student_taps():
    net = create_model("resnet8", 10)
    with pytest.raises(UserError, match="only 3 taps for 4 teacher taps"):
        default_student_taps(list_taps(net, 32), [i["module"] for i in net.feature_info], 4)


def test_distiller_stops_after_last_tap_and_trains_nothing_after():
    net = create_model("resnet8", 10)
    taps = list_taps(net, 32, names=["layer1.0", "layer2.0"])
    distiller = FeatureDistiller(net, taps, [Tap(0, "a", (32, 16, 16)), Tap(1, "b", (64, 8, 8))])
    _, losses = distiller(torch.randn(2, 3, 32, 32), [torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8)])
    losses["feature_mse"].backward()
    assert net.stem[0].weight.grad is not None and net.layer2[0].conv1.weight.grad is not None
    assert net.layer3[0].conv1.weight.grad is None and net.fc.weight.grad is None
