"""Ranks under torchrun: who this process is, the few collective steps the stages need, and the launch.

`torchrun --nproc_per_node N -m stages.<stage> ...` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK
in their environment; without torchrun a stage is one process (rank 0 of 1) and nothing here does anything.
The process group uses NCCL when the ranks have GPUs and gloo on the CPU.

`launch_ranks` is how `dvc repro` scales: a stage started as one process with `dist.nproc` > 1 runs itself
again under torchrun's launcher (standalone, this machine) and waits for its ranks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


def all_gather(value: Any, ranks: Ranks) -> list:
    """Every rank's `value` (any picklable object), in rank order; ``[value]`` with one rank."""
    if ranks.world_size == 1:
        return [value]
    out: list = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


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


def launch_ranks(module: str, nproc: int, device: str, argv: Sequence[str] | None = None) -> bool:
    """Run `python -m module *argv` as `nproc` ranks under torchrun's launcher when `nproc` > 1 and this
    process is not a rank already; return whether it did (the caller then has nothing left to do).

    On the CPU every rank keeps the intra-op thread count of a one-process run (torchrun would give each one
    thread): CPU kernels sum in an order that depends on the thread count, so this is what keeps the
    inference stores' bytes independent of `nproc`. The ranks then share the cores, so their idle OpenMP
    threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE; spinning made 2 ranks of 2 threads on 2 cores
    4x slower than one process, README "Scaling out"); either variable set by the user wins.

    A rank that fails makes the launch fail with one line naming it; the ranks' finished work (parts,
    checkpoints) is kept, so the same command resumes.
    """
    if nproc <= 1 or "RANK" in os.environ:
        return False
    if str(device).startswith("cuda"):
        if torch.cuda.device_count() < nproc:
            raise PipelineError(
                f"dist.nproc = {nproc} ranks asked for, but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", module])
    args.training_script_args = argv
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the line below says it all
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(file=sys.stderr)  # off the line a rank's progress bar was left on
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
        raise PipelineError(
            f"{module}: rank {rank} of {nproc} {how}; the other ranks were stopped. What the ranks finished is kept: "
            "run the same command again to resume"
        ) from None
    return True
