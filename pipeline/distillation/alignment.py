"""Feature alignment of one student tap with one teacher tap: layouts, pooling and the projector (docs/method.md §3).

Alignment is separate from the criterion: every feature loss (`pipeline.distillation.losses.FeatureLoss`) owns the
alignments of its pairs and compares what they produce, so a new feature criterion reuses the projection and pooling as
they are.

Both taps are first brought onto an image grid by their recorded layouts (`pipeline.models.taps`): NCHW maps as they
are, NHWC maps permuted, tokens without their prefix tokens reshaped onto their patch grid, vectors as 1×1 maps. Then
the larger grid is adaptive-average-pooled to the smaller one, so each compared cell covers the same image region
on both sides, and a bias-free 1×1 projector maps student channels to teacher channels. docs/pipeline.md has the
table of every pairing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.taps import Tap, pool_embedding


class FeatureAlignment(nn.Module):
    """Aligns one student tap with one cached teacher tap and projects student channels to teacher channels.

    - Grids: the student grid no larger than the teacher's in both axes pools the teacher to it; larger in both pools
      the student; anything else (larger in one axis, or equal in one and larger in the other) is an error.
    - Prefix tokens: kept and compared one to one when both sides are tokens with the same number of them (ViT→ViT,
      as the reference distils all 65 tokens); compared with a vector tap through the class token (the first);
      dropped otherwise (a class token has no image region to meet a CNN cell).
    - A vector meets a map or patch grid pooled to 1×1.
    - Tokens without a patch grid meet other taps along the token axis (maps flattened), by the same pooling rule.
    - Projector: `Conv2d(C_s, C_t, 1, bias=False)` between maps, `Conv1d(C_s, C_t, 1, bias=False)` over the token
      sequence (prefix tokens, then grid cells in row-major order) when either side is a transformer's tokens.
    """

    def __init__(self, student: Tap, teacher: Tap) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.tokens = "NLC" in (student.layout, teacher.layout)
        self.vector = "NC" in (student.layout, teacher.layout)
        self.sequence = not self.vector and (_gridless(student) or _gridless(teacher))
        same_prefix = student.layout == teacher.layout == "NLC" and student.prefix_tokens == teacher.prefix_tokens
        self.keep_prefix = same_prefix and student.prefix_tokens > 0 and not self.vector
        if self.vector:
            self.student_size = self.teacher_size = None
        else:
            extents = (self._extent(student), self._extent(teacher))
            self.student_size, self.teacher_size = _pooled_sizes(student, teacher, *extents)
        conv = nn.Conv1d if self.tokens else nn.Conv2d
        self.projector = conv(student.channels, teacher.channels, 1, bias=False)

    def _extent(self, tap: Tap) -> tuple[int, ...]:
        """The body's size: its grid, or its length along the token axis when a side has no grid."""
        if not self.sequence:
            return tuple(tap.spatial)
        return (tap.shape[0] - tap.prefix_tokens,) if tap.layout == "NLC" else (tap.spatial[0] * tap.spatial[1],)

    def _body(self, x: torch.Tensor, tap: Tap) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(kept prefix tokens as (B, C, P) or None, the body: (B, C, H, W), or (B, C, L) on the token axis)."""
        if self.vector:
            return None, _as_vector(x, tap)[:, :, None, None]
        if not self.sequence:
            prefix, grid = grid_parts(x, tap)
            return (prefix if self.keep_prefix else None), grid
        if tap.layout in ("NCHW", "NHWC"):
            return None, (x.permute(0, 3, 1, 2) if tap.layout == "NHWC" else x).flatten(2)
        return None, x.transpose(1, 2)[:, :, tap.prefix_tokens :]

    def _align(self, x: torch.Tensor, tap: Tap, size: tuple[int, ...] | None) -> torch.Tensor:
        prefix, body = self._body(x, tap)
        if size is not None and tuple(body.shape[2:]) != tuple(size):
            body = F.adaptive_avg_pool1d(body, size) if body.dim() == 3 else F.adaptive_avg_pool2d(body, size)
        if not self.tokens:
            return body
        body = body.flatten(2)
        return torch.cat([prefix, body], dim=2) if prefix is not None else body

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected student, teacher target): same shape, channels on axis 1, float32 targets."""
        projected = self.projector(self._align(student, self.student, self.student_size))
        target = self._align(teacher.float(), self.teacher, self.teacher_size)
        return projected, target


def grid_parts(x: torch.Tensor, tap: Tap) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix tokens (B, C, P), the image grid (B, C, H, W)) of a map or of tokens on a patch grid; a map has P = 0."""
    if tap.layout in ("NCHW", "NHWC"):
        grid = x.permute(0, 3, 1, 2) if tap.layout == "NHWC" else x
        return grid.new_zeros(*grid.shape[:2], 0), grid
    tokens = x.transpose(1, 2)  # (B, C, T)
    patches = tokens[:, :, tap.prefix_tokens :]
    return tokens[:, :, : tap.prefix_tokens], patches.reshape(*patches.shape[:2], *tap.grid)


def _as_vector(x: torch.Tensor, tap: Tap) -> torch.Tensor:
    """(B, C): a vector as it is, tokens by their class token, anything else averaged over space or tokens."""
    if tap.layout == "NLC" and tap.prefix_tokens:
        return x[:, 0]
    return pool_embedding(x, tap.layout)


def _gridless(tap: Tap) -> bool:
    return tap.layout == "NLC" and tap.grid is None


def _pooled_sizes(
    student: Tap, teacher: Tap, s_extent: tuple[int, ...], t_extent: tuple[int, ...]
) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(student pooled to, teacher pooled to): docs/method.md §3's rule, None where a side is left as it is."""
    if s_extent == t_extent:
        return None, None
    if all(s <= t for s, t in zip(s_extent, t_extent, strict=True)):
        return None, s_extent
    if all(s > t for s, t in zip(s_extent, t_extent, strict=True)):
        return t_extent, None
    raise UserError(
        f"student tap {student.name} {student.shape} ({student.describe()}) and teacher tap {teacher.name} "
        f"{teacher.shape} ({teacher.describe()}): the student's grid {s_extent} is larger than the teacher's "
        f"{t_extent} in one axis but not in both; pick taps of compatible sizes"
    )
