"""How a stage's forward and backward passes run: mixed precision, memory layout and the CUDA-only speed settings.

One `Precision` per run, built from the `SpeedOptions` of teach, extract and distill (and from a store's record for
`verify --recompute`), owns every such choice, so that the stages only ask it for an autocast context, a model or a
batch in the chosen layout, and an optimizer step:

- `amp` bf16 or fp16 runs the forward passes under `torch.autocast`. fp16 training scales its loss
  (`torch.amp.GradScaler`, whose state travels in the epoch checkpoints, so a resumed run continues exactly); bf16
  has float32's range and needs no scaler. fp16 is CUDA's only: on the CPU it measured slower than float32
  (benchmarks/README.md, P12), and bf16 is the CPU's mixed precision.
- `channels_last` converts the models and the image batches to channels-last memory (on the CPU too, where
  oneDNN's bf16 convolutions need it to be fast).
- On CUDA: pinned host memory for the loaders, non-blocking copies, and `cudnn.benchmark` when asked.

Left at their defaults (amp off, channels-first) every pass runs exactly as it did without this module, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from ..errors import UserError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_RECORD = "amp"  # the key a store's identity and a run's spec record the precision under


class Precision:
    """The precision and layout settings of one run on `device`; `training` gives fp16 its loss scaler."""

    def __init__(
        self,
        device: torch.device,
        amp: str = "off",
        channels_last: bool = False,
        cudnn_benchmark: bool = True,
        training: bool = False,
        refused_as: str = "--amp=fp16",
    ) -> None:
        if amp == "fp16" and device.type != "cuda":
            raise UserError(
                f"{refused_as}: float16 autocast needs CUDA; on the CPU it runs slower than float32 (bf16 is the "
                "CPU's mixed precision: --amp=bf16)"
            )
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        self.scaler = torch.amp.GradScaler("cuda") if training and amp == "fp16" else None

    @classmethod
    def of(cls, config: Any, device: torch.device, training: bool = False) -> Precision:
        """From a config's `SpeedOptions`."""
        return cls(device, config.amp, config.channels_last, config.cudnn_benchmark, training)

    @property
    def pin_memory(self) -> bool:
        """Loaders pin their batches for CUDA only (pinning gains nothing for the CPU)."""
        return self.cuda

    def autocast(self) -> contextlib.AbstractContextManager:
        """Around a forward pass (and its loss): torch.autocast at the chosen precision, nothing when off."""
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def model(self, module: nn.Module) -> nn.Module:
        """`module` on the device, in channels-last memory when asked."""
        module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """An image batch on the device (copied without waiting, from pinned memory, on CUDA), in the model's
        memory format."""
        images = images.to(self.device, non_blocking=self.cuda)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """One optimizer step on `loss`'s gradients; with fp16, scaled (a step whose gradients overflowed is
        skipped and the scale lowered, as GradScaler does)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def record(self) -> dict[str, str]:
        """What a store's identity and a run's spec record: the precision when it is not float32 (absent otherwise,
        so stores and runs from before AMP keep their identity)."""
        return {} if self.amp == "off" else {AMP_RECORD: self.amp}
