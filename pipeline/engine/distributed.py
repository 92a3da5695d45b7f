"""Several processes on torch.distributed: torchrun starts them, this module says which one each is and lets them
agree.

`kdpipe extract` and `kdpipe distill` run as one process, or as N under `torchrun --nproc-per-node N -m
pipeline.cli ...` (gloo on the CPU; NCCL for CUDA tensors, gloo for the Python objects ranks exchange). The command
line joins the process group torchrun describes in the environment (`joined`); library code asks `current()` which
rank it is, so a user's own torchrun script that has joined a group calls `extract(...)` or `distill(...)` alike.
Rank 0 (the main rank) owns every metadata write and every run-folder file; `from_main` runs a step there and gives
its result, or its error, to every rank, so a refusal ends all ranks with the same one-line error instead of
leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run: rank `rank` of `size`, `local_rank` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """The rank's own device: its machine's GPU `local_rank` when the run is on CUDA."""
        if device.type != "cuda" or not self.distributed:
            return device
        local = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(local)
        return local

    def from_main(self, step: Callable[[], T]) -> T:
        """`step()` run on the main rank alone, its result (picklable) returned on every rank; a user-facing error
        there is raised on every rank with the same message. One process: just `step()`."""
        if not self.distributed:
            return step()
        outcome: list[Any] = [None]
        error: Exception | None = None
        if self.is_main:
            try:
                outcome = [("result", step())]
            except Exception as err:  # the others must hear of it, whatever it is
                error, outcome = err, [("error", first_line(err))]
        dist.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
        kind, value = outcome[0]
        if kind == "error":
            raise UserError(value)
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64, on the CPU: a few numbers per epoch)."""
        total = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(total)  # a CPU tensor: gloo carries it, whatever carries the gradients
        return total.tolist()

    def parallel(self, module: nn.Module, sync_batchnorm: bool = False) -> nn.Module:
        """`module` as DistributedDataParallel trains it across the ranks (itself in one process). Its parameters
        that a method leaves out of the loss (a feature method stops the student after its last tap) get no
        gradient, so DDP looks for them each step. With `sync_batchnorm`, BatchNorm layers normalise over the whole
        global batch (SyncBatchNorm, in place: the parameters stay the ones the optimizer holds)."""
        if not self.distributed:
            return module
        if sync_batchnorm:  # BatchNorm layers replaced inside `module`, keeping their parameters
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        device = next(module.parameters()).device
        ids = [device] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def share(self, batch: T) -> T:
        """This rank's contiguous share of a global batch (its length divisible by the ranks)."""
        size = len(batch) // self.size
        return batch[self.rank * size : (self.rank + 1) * size]

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of `items`: every `size`-th, starting at its rank (balanced to within one item)."""
        return items[self.rank :: self.size]


def current() -> World:
    """The world of the process group this process has joined; one process when it has joined none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> int:
    """The number of processes torchrun started for this run (WORLD_SIZE), 1 when not started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend() -> str:
    """NCCL carries CUDA tensors (DDP's gradients), gloo the CPU ones and the Python objects ranks exchange."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def joined(command: str) -> Iterator[World]:
    """Around a command that runs on several processes: joins the process group torchrun's environment describes
    (nothing to join without torchrun), and leaves it at the end. Ranks other than 0 log warnings only, so a run
    prints its progress once."""
    if launched() == 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(f"kdpipe {command}: WORLD_SIZE is set but {', '.join(missing)} are not; start it with torchrun")
    dist.init_process_group(backend())
    world = current()
    if not world.is_main:
        for name in ("pipeline", "cache"):
            logging.getLogger(name).setLevel(logging.WARNING)
    log.info("kdpipe %s: %d processes (%s)", command, world.size, dist.get_backend())
    try:
        yield world
    finally:
        dist.destroy_process_group()


def refuse_several(command: str) -> None:
    """A command that runs in one process only, started by torchrun on several: refused, not run N times over."""
    if launched() > 1:
        raise UserError(
            f"kdpipe {command} runs in one process; only extract and distill run under torchrun "
            f"(WORLD_SIZE={launched()})"
        )
