"""Ranks under torchrun: who this process is, and the few collective steps the stages need.

`torchrun --nproc_per_node N -m stages.<stage> ...` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK
in their environment; without torchrun a stage is one process (rank 0 of 1) and nothing here does anything.
The process group uses NCCL when the ranks have GPUs and gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise PipelineError(f"environment: {name}={value!r} is not an integer (set by torchrun)") from None


def init_ranks(device: str = "cpu") -> Ranks:
    """This process's place among torchrun's (rank 0 of 1 without torchrun); joins the process group
    (NCCL for CUDA devices, else gloo) when there are several ranks."""
    ranks = Ranks(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if not 0 <= ranks.rank < ranks.world_size:
        raise PipelineError(f"environment: RANK={ranks.rank} is not in [0, WORLD_SIZE={ranks.world_size})")
    if ranks.world_size > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return ranks


def rank_device(device: str, ranks: Ranks) -> str:
    """The device of this rank: its own GPU (cuda:LOCAL_RANK) when the stage runs on CUDA, else `device`."""
    if str(device) == "cuda" and ranks.world_size > 1:
        return f"cuda:{ranks.local_rank}"
    return str(device)


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing with one)."""
    if ranks.world_size > 1:
        dist.barrier()


@contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creating a work folder), the other ranks after it."""
    if not ranks.is_main:
        barrier(ranks)
    yield
    if ranks.is_main:
        barrier(ranks)


def main_goes_on(ranks: Ranks) -> bool:
    """Wait until every rank has saved its share; then the other ranks leave the group (without waiting for
    rank 0's assembly, which at LVIS size may outlast a collective's timeout) and only rank 0 goes on.
    Returns whether this rank goes on."""
    barrier(ranks)
    if not ranks.is_main:
        shutdown(ranks)
    return ranks.is_main


def shutdown(ranks: Ranks) -> None:
    """Leave the process group (a local step: no rank waits for the others)."""
    if ranks.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
