"""Feature alignment of one student tap with one teacher tap: layout, pooling and the projector (METHOD.md §3).

Alignment is separate from the criterion: every feature loss (`pipeline.losses.FeatureLoss`) compares the aligned
pair this module produces, so a new feature criterion reuses the projection and pooling as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .taps import Tap


def _as_map_or_tokens(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Vectors are 1×1 maps, so a pooled teacher vector meets a student map through the map rule."""
    return (shape[0], 1, 1) if len(shape) == 1 else tuple(shape)


class FeatureAlignment(nn.Module):
    """Aligns one student tap with one cached teacher tap and projects student channels to teacher channels.

    Conv maps (C, H, W): whichever map is larger in both axes is adaptive-average-pooled to the other's size (a map
    larger in one axis and smaller in the other is an error); the projector is a bias-free 1×1 Conv2d. When either
    side is a transformer's tokens (T, D), both become (B, channels, tokens), conv maps as (C, H·W), the token axis
    is pooled by the same rule, and the projector is a bias-free Conv1d of kernel 1 (a per-token linear map).
    """

    def __init__(self, student: Tap, teacher: Tap) -> None:
        super().__init__()
        s_shape, t_shape = _as_map_or_tokens(student.shape), _as_map_or_tokens(teacher.shape)
        self.tokens = len(s_shape) == 2 or len(t_shape) == 2
        s_channels, s_extent = self._channels_and_extent(s_shape)
        t_channels, t_extent = self._channels_and_extent(t_shape)
        if s_extent == t_extent:
            self.student_size = self.teacher_size = None
        elif all(s <= t for s, t in zip(s_extent, t_extent, strict=True)):
            self.student_size, self.teacher_size = None, s_extent
        elif all(s >= t for s, t in zip(s_extent, t_extent, strict=True)):
            self.student_size, self.teacher_size = t_extent, None
        else:
            raise UserError(
                f"student tap {student.name} {student.shape} and teacher tap {teacher.name} {teacher.shape}: "
                "one map is larger in one axis and smaller in the other; pick taps of compatible sizes"
            )
        conv = nn.Conv1d if self.tokens else nn.Conv2d
        self.projector = conv(s_channels, t_channels, 1, bias=False)

    def _channels_and_extent(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        if not self.tokens:
            return shape[0], tuple(shape[1:])
        if len(shape) == 2:  # tokens (T, D): D channels over T tokens
            return shape[1], (shape[0],)
        return shape[0], (shape[1] * shape[2],)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) maps, or (B, channels, tokens) when tokens are involved; vectors as 1×1 maps."""
        if x.dim() == 2:
            x = x[:, :, None, None]
        if not self.tokens:
            return x
        return x.transpose(1, 2) if x.dim() == 3 else x.flatten(2)

    def _pool(self, x: torch.Tensor, size: tuple[int, ...] | None) -> torch.Tensor:
        if size is None or tuple(x.shape[2:]) == tuple(size):
            return x
        return F.adaptive_avg_pool1d(x, size) if self.tokens else F.adaptive_avg_pool2d(x, size)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected student, teacher target): same shape, channels on axis 1, float32 targets."""
        projected = self.projector(self._pool(self._layout(student), self.student_size))
        target = self._pool(self._layout(teacher.float()), self.teacher_size)
        return projected, target
