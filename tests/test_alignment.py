"""Feature alignment between any two tap layouts (docs/method.md §3, docs/pipeline.md): the pooling and projector rules,
and planted maps whose cells carry unique values, which must reach exactly the positions covering the same image
region on the other side."""

from __future__ import annotations

import pytest
import torch

from pipeline.distillation.alignment import FeatureAlignment
from pipeline.errors import UserError
from pipeline.models.taps import Tap


def pair(s_shape, t_shape, **layouts) -> FeatureAlignment:
    student = Tap(0, "s", tuple(s_shape), **layouts.get("student", {}))
    return FeatureAlignment(student, Tap(0, "t", tuple(t_shape), **layouts.get("teacher", {})))


def identity(alignment: FeatureAlignment) -> FeatureAlignment:
    """The projector set to the identity, so what it outputs is the aligned student itself."""
    weight = alignment.projector.weight
    with torch.no_grad():
        weight.copy_(torch.eye(weight.shape[0]).reshape(weight.shape))
    return alignment


def region_means(grid: torch.Tensor, cells: int) -> torch.Tensor:
    """(C, cells, cells) from (C, n, n) by hand: each output cell is the mean of the n/cells square it covers."""
    step = grid.shape[1] // cells
    out = torch.empty(grid.shape[0], cells, cells)
    for i in range(cells):
        for j in range(cells):
            out[:, i, j] = grid[:, i * step : (i + 1) * step, j * step : (j + 1) * step].mean(dim=(1, 2))
    return out


def planted(channels: int, side: int) -> torch.Tensor:
    """(channels, side, side) with a different value in every cell and channel."""
    return torch.arange(channels * side * side, dtype=torch.float32).reshape(channels, side, side)


def as_tokens(grid: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """(C, H, W) and (P, C) prefix tokens -> (P + H·W, C): prefix first, then patches in row-major order."""
    return torch.cat([prefix, grid.flatten(1).T])


@pytest.mark.parametrize(
    "s_shape,t_shape,conv,student_pool,teacher_pool",
    [
        ((64, 8, 8), (256, 8, 8), torch.nn.Conv2d, None, None),  # CNN -> CNN, same size
        ((64, 32, 32), (256, 8, 8), torch.nn.Conv2d, (8, 8), None),  # student larger: student pooled
        ((512, 4, 4), (256, 8, 8), torch.nn.Conv2d, None, (4, 4)),  # teacher larger: teacher pooled
        ((64, 8, 8), (65, 192), torch.nn.Conv1d, None, None),  # CNN student, ViT teacher: 8x8 cells vs 8x8 patches
        ((64, 16, 16), (65, 192), torch.nn.Conv1d, (8, 8), None),  # student map pooled onto the patch grid
        ((65, 96), (17, 192), torch.nn.Conv1d, (4, 4), None),  # ViT grids 8x8 -> 4x4, class tokens kept
        ((16, 16, 96), (64, 8, 8), torch.nn.Conv2d, (8, 8), None),  # NHWC student, NCHW teacher
        ((128, 4, 4), (64,), torch.nn.Conv2d, None, None),  # teacher vector: the student map is averaged
    ],
)
def test_alignment_rules(s_shape, t_shape, conv, student_pool, teacher_pool):
    p = pair(s_shape, t_shape)
    assert isinstance(p.projector, conv) and p.projector.bias is None
    assert p.student_size == student_pool and p.teacher_size == teacher_pool
    projected, target = p(torch.randn(2, *s_shape), torch.randn(2, *t_shape))
    assert projected.shape == target.shape and projected.shape[1] == p.projector.out_channels


def test_vit_to_vit_projects_per_token_over_all_tokens():
    """Equal grids and class tokens: the reference's per-token Conv1d over all 65 tokens, nothing pooled."""
    p = pair((65, 96), (65, 192))
    assert isinstance(p.projector, torch.nn.Conv1d) and p.projector.weight.shape == (192, 96, 1)
    s, t = torch.randn(3, 65, 96), torch.randn(3, 65, 192)
    projected, target = p(s, t)
    assert torch.allclose(projected, torch.einsum("od,btd->bot", p.projector.weight[:, :, 0], s), atol=1e-5)
    assert torch.equal(target, t.transpose(1, 2))


def test_teacher_map_reaches_the_student_tokens_over_the_same_region():
    """CNN teacher 8x8 -> ViT student with a 4x4 patch grid: patch (i, j) meets the mean of the teacher's 2x2 cells
    under it; the student's class token meets nothing."""
    teacher = planted(6, 8)
    student = as_tokens(planted(6, 4) + 1000, prefix=torch.full((1, 6), -1e6))
    p = identity(pair(student.shape, teacher.shape))
    projected, target = p(student[None], teacher[None])
    assert torch.equal(target[0], region_means(teacher, 4).flatten(1))
    assert torch.equal(projected[0], (planted(6, 4) + 1000).flatten(1))  # patches in row-major order, no class token


def test_student_map_is_pooled_onto_the_teacher_patch_grid():
    """CNN student 8x8 against ViT teacher tokens on a 4x4 grid (two prefix tokens, as DeiT's): the student is
    pooled by image region, the teacher's prefix tokens are dropped."""
    student = planted(5, 8)
    teacher = as_tokens(planted(5, 4), prefix=torch.full((2, 5), 1e6))
    p = identity(pair(student.shape, teacher.shape))
    projected, target = p(student[None], teacher[None])
    assert torch.equal(projected[0], region_means(student, 4).flatten(1))
    assert torch.equal(target[0], planted(5, 4).flatten(1))


def test_tokens_of_different_grids_meet_by_region_and_class_token():
    teacher_grid, teacher_cls = planted(4, 8), torch.full((1, 4), 7.0)
    student_grid, student_cls = planted(4, 4) + 100, torch.full((1, 4), -3.0)
    teacher, student = as_tokens(teacher_grid, teacher_cls), as_tokens(student_grid, student_cls)
    p = identity(pair(student.shape, teacher.shape))
    projected, target = p(student[None], teacher[None])
    assert torch.equal(target[0], torch.cat([teacher_cls.T, region_means(teacher_grid, 4).flatten(1)], dim=1))
    assert torch.equal(projected[0], torch.cat([student_cls.T, student_grid.flatten(1)], dim=1))


def test_channels_last_maps_are_read_as_maps():
    """An NHWC teacher (Swin) 8x8: cell (h, w) of channel c is teacher[h, w, c], pooled by region onto 4x4."""
    teacher_nchw = planted(3, 8)
    teacher = teacher_nchw.permute(1, 2, 0)  # (8, 8, 3): channels last
    student = planted(3, 4)
    p = identity(pair(student.shape, teacher.shape))
    assert p.teacher.layout == "NHWC"
    projected, target = p(student[None], teacher[None])
    assert torch.equal(target[0], region_means(teacher_nchw, 4))
    assert torch.equal(projected[0], student)


def test_channels_last_tie_is_broken_by_the_recorded_layout():
    """(8, 8, 8) says nothing by its shape; the layout recorded from the model decides."""
    cube = planted(8, 8)
    as_nhwc = pair((8, 4, 4), (8, 8, 8), teacher={"layout": "NHWC"})
    as_nchw = pair((8, 4, 4), (8, 8, 8))
    target_nhwc = identity(as_nhwc)(torch.zeros(1, 8, 4, 4), cube[None])[1][0]
    target_nchw = identity(as_nchw)(torch.zeros(1, 8, 4, 4), cube[None])[1][0]
    assert torch.equal(target_nchw, region_means(cube, 4))
    assert torch.equal(target_nhwc, region_means(cube.permute(2, 0, 1), 4))


def test_class_token_meets_a_vector():
    teacher_vector = torch.arange(4.0)
    student = as_tokens(planted(4, 4), prefix=torch.full((1, 4), 9.0))
    p = identity(pair(student.shape, teacher_vector.shape))
    projected, target = p(student[None], teacher_vector[None])
    assert torch.equal(projected[0, :, 0], torch.full((4,), 9.0)) and torch.equal(target[0, :, 0], teacher_vector)


def test_student_map_averaged_against_a_teacher_vector():
    student = planted(2, 4)
    p = identity(pair(student.shape, (2,)))
    projected, _ = p(student[None], torch.zeros(1, 2))
    assert torch.equal(projected[0, :, 0, 0], student.mean(dim=(1, 2)))


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((64, 16, 4), (64, 8, 8)),  # larger in one axis, smaller in the other
        ((64, 8, 16), (64, 8, 8)),  # equal in one axis and larger in the other (docs/method.md §3: an error)
    ],
)
def test_mixed_sizes_are_an_error(s_shape, t_shape):
    with pytest.raises(UserError, match="larger than the teacher's"):
        pair(s_shape, t_shape)


def test_loss_by_hand_with_identity_projector():
    """Student 4x4 map pooled to the teacher's 2x2, identity projection, plain mean of squared errors."""
    p = identity(pair((2, 4, 4), (2, 2, 2)))
    s = torch.arange(32.0).reshape(1, 2, 4, 4)
    t = torch.zeros(1, 2, 2, 2)
    pooled = s.reshape(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 average pooling by hand
    projected, target = p(s, t)
    assert torch.equal(projected, pooled) and torch.equal(target, t)


def test_teacher_targets_are_float16_friendly():
    p = pair((8, 4, 4), (8, 4, 4))
    assert p(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4).half())[1].dtype == torch.float32
