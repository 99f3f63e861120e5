"""Inference plumbing shared by `propose` and `sample`: inputs read ahead in DataLoader workers, and autocast.

`prefetch(items, read, ...)` yields `read(item)` for every item, in order, in lists of `batch_size`
(`prefetch_groups(groups, read, ...)`: in the given lists, which may span the parts of a split, so that a stage's
workers start once, not once per part: forking 4 workers from a process holding CUDA took 0.5 s on a lent H200,
and each part's first batch then waited for its decoding). With
``num_workers=0`` it reads in the calling process, one batch when it is asked for (what the stages always did);
with workers the reads (image decoding) run in `num_workers` processes, `prefetch_factor` batches ahead each,
the numpy arrays in what `read` returns come back as tensors (shared memory rather than pickles), and on CUDA
in pinned memory, so that ``.to(device, non_blocking=True)`` overlaps the
copy with the work already queued. A PipelineError raised by `read` in a worker (a missing image, say) is
raised again in the calling process when its item's batch is reached, with its own one-line message: the
same error, at the same point, as without workers.

`decoding_workers(setting, device)`: the `num_workers` params (``proposer``, ``propose``, ``sample``) as a count;
``auto`` starts workers only on a GPU, where they were measured to pay (README, "At LVIS size on a GPU").

`autocast(device, amp)`: torch's automatic mixed precision for inference, ``amp`` one of ``off`` (a no-op),
``bf16`` or ``fp16``; a device type or torch build without autocast in that dtype is a PipelineError.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.distributed import _env_int
from pipeline.errors import PipelineError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFETCH_FACTOR = 2  # batches each worker reads ahead (torch's default)
AUTO_WORKERS = 4  # at most this many decoding workers per rank under `num_workers: auto` on a GPU

__all__ = [
    "AMP_DTYPES",
    "AUTO_WORKERS",
    "PREFETCH_FACTOR",
    "autocast",
    "chunks",
    "decoding_workers",
    "part_batches",
    "prefetch",
    "prefetch_groups",
]


def decoding_workers(setting: int | str, device: str | torch.device) -> int:
    """How many DataLoader workers decode images: an int `setting` as it is; ``"auto"``: none on the CPU, on a
    GPU ``AUTO_WORKERS``, fewer when the CPUs this process may use, shared by the ranks of its machine
    (torchrun's ``LOCAL_WORLD_SIZE``), leave fewer than that besides the rank's own process.

    Why: on an H100 with 16 cores, 4 workers made the proposer's training step 2.3x faster, `propose` 1.8x and
    `sample` 1.2x at 800 px (the decoding had kept the GPU waiting); on the 2-core CPU machine they gave no steady
    gain (0.95x to 1.02x with one thread, 3 to 13 % slower on idle cores), the decoding competing with the network
    for the same cores.
    The count never changes what a stage writes."""
    if setting != "auto":
        return int(setting)
    if torch.device(device).type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    return max(0, min(AUTO_WORKERS, cpus // ranks_here - 1))


def autocast(device: str | torch.device, amp: str) -> contextlib.AbstractContextManager:
    """A context running eligible ops in `amp`'s dtype on `device` (``off``: a null context)."""
    if amp not in AMP_DTYPES:
        raise PipelineError(f"amp: expected one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        raise PipelineError(f"amp {amp}: torch has no autocast for device {device_type!r} (use amp: off)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context = torch.autocast(device_type, dtype=dtype)
    for warning in caught:  # older torch builds disable autocast for an unsupported dtype with a warning
        if "not supported" in str(warning.message) or "Disabling autocast" in str(warning.message):
            raise PipelineError(
                f"amp {amp}: this torch build has no {dtype} autocast on {device_type} (use bf16 or off)"
            )
    return context


class _Failed:
    """A PipelineError raised by `read` in a worker, carried back to be raised in the calling process."""

    def __init__(self, error: PipelineError) -> None:
        self.error = error


def _as_tensors(value: Any) -> Any:
    """`value` with every numpy array in it (also inside tuples and lists) as a tensor on the same memory."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, tuple | list):
        return type(value)(_as_tensors(v) for v in value)
    return value


class _Reads(torch.utils.data.Dataset):
    def __init__(self, items: Sequence, read: Callable[[Any], Any]) -> None:
        self.items, self.read = items, read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        try:
            return _as_tensors(self.read(self.items[index]))
        except PipelineError as err:
            return _Failed(err)


def _as_list(batch: list) -> list:
    return batch


def _checked(batch: list) -> list:
    for value in batch:
        if isinstance(value, _Failed):
            raise value.error
    return batch


def prefetch(
    items: Iterable,
    read: Callable[[Any], Any],
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = PREFETCH_FACTOR,
) -> Iterator[list]:
    """Lists of ``read(item)`` for consecutive `batch_size` items, in order (see the module docstring).

    `pin_memory` takes effect only with workers and CUDA (elsewhere there is nothing to pin for). Workers
    are forked where the platform allows it, so `read` may be a closure; elsewhere it must pickle.
    """
    return prefetch_groups(
        chunks(items, batch_size), read, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor
    )


def chunks(items: Iterable, size: int) -> list[list]:
    """`items` in consecutive lists of `size` (the last one shorter): `prefetch`'s batches, and a part's in the
    stages' `prefetch_groups` streams, which must be the same."""
    items, size = list(items), max(1, int(size))
    return [items[start : start + size] for start in range(0, len(items), size)]


def prefetch_groups(
    groups: Iterable[Sequence],
    read: Callable[[Any], Any],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = PREFETCH_FACTOR,
) -> Iterator[list]:
    """``[read(item) for item in group]`` for each of the (non-empty) `groups`, in order, read ahead by one set
    of `num_workers` workers for them all (`prefetch` otherwise). A stage's parts take their groups from one such
    stream (`part_batches`), so that a part's first images are decoded while the previous part finishes; close
    the stream (``contextlib.closing``) to stop its workers when the parts are done or one fails."""
    groups = [list(group) for group in groups]
    if any(not group for group in groups):
        raise ValueError("prefetch_groups: every group needs an item")
    if num_workers <= 0 or not groups:  # nothing to read: no workers to start
        return ([read(item) for item in group] for group in groups)
    return _loader_batches(groups, read, int(num_workers), pin_memory, prefetch_factor)


def part_batches(stream: Iterator[list], n_batches: int, first: int) -> Iterator[list]:
    """The next `n_batches` batches of a `prefetch_groups` stream of ``(index, value)`` reads, made local to the
    part that starts at index `first` (what `propose_split` and `sample_split` take as ``batches``)."""
    for batch in itertools.islice(stream, n_batches):
        yield [(i - first, value) for i, value in batch]


def _loader_batches(
    groups: list[list], read: Callable[[Any], Any], num_workers: int, pin_memory: bool, prefetch_factor: int
) -> Iterator[list]:
    """`prefetch_groups` with workers: one DataLoader whose batches are the groups."""
    items = [item for group in groups for item in group]
    ends = np.cumsum([len(group) for group in groups]).tolist()
    batches = [list(range(end - len(group), end)) for group, end in zip(groups, ends, strict=True)]
    methods = multiprocessing.get_all_start_methods()
    loader = torch.utils.data.DataLoader(
        _Reads(items, read),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_as_list,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        prefetch_factor=max(1, int(prefetch_factor)),
        multiprocessing_context="fork" if "fork" in methods else None,
    )
    for batch in loader:
        yield _checked(batch)
