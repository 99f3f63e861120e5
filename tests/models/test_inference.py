"""`pipeline.models.inference`: `prefetch` and `prefetch_groups` give the same batches in the same order with and
without workers; `decoding_workers` resolves the `num_workers` params."""

import os

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models.inference import AUTO_WORKERS, decoding_workers, part_batches, prefetch, prefetch_groups


def _read(i: int) -> tuple[int, np.ndarray, list]:
    return i, np.full((2, 3), i, dtype=np.uint8)[:, ::2], [np.arange(i)]  # a strided view, a nested array


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_in_order_and_arrays_as_tensors_from_workers(num_workers):
    batches = list(prefetch(range(7), _read, batch_size=3, num_workers=num_workers))
    assert [len(b) for b in batches] == [3, 3, 1]
    for i, (index, pixels, nested) in enumerate(item for batch in batches for item in batch):
        assert index == i
        kind = torch.Tensor if num_workers else np.ndarray
        assert isinstance(pixels, kind) and isinstance(nested[0], kind)
        np.testing.assert_array_equal(np.asarray(pixels), np.full((2, 2), i, dtype=np.uint8))
        np.testing.assert_array_equal(np.asarray(nested[0]), np.arange(i))


def _failing(i: int) -> int:
    if i == 4:
        raise PipelineError(f"image {i}: unreadable")
    return i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_read_error_is_raised_at_its_batch(num_workers):
    seen = []
    with pytest.raises(PipelineError, match="image 4: unreadable"):
        for batch in prefetch(range(7), _failing, batch_size=2, num_workers=num_workers):
            seen.extend(batch)
    assert seen == [0, 1, 2, 3]


def test_decoding_workers_auto_starts_workers_on_a_gpu_only(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert decoding_workers(3, "cpu") == 3 and decoding_workers(0, "cuda") == 0  # a number is taken as it is
    assert decoding_workers("auto", "cpu") == 0
    assert decoding_workers("auto", "cuda") == decoding_workers("auto", "cuda:1") == AUTO_WORKERS == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks share the 16 CPUs: 2 each, one of them the rank's
    assert decoding_workers("auto", "cuda:3") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert decoding_workers("auto", "cuda") == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert decoding_workers("auto", "cuda") == 1


def _pid(i: int) -> tuple[int, int]:
    return i, os.getpid()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_groups_come_back_as_given_from_one_set_of_workers(num_workers):
    groups = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9], [10]]
    stream = prefetch_groups(groups, _pid, num_workers=num_workers)
    parts = [list(part_batches(stream, n, first)) for n, first in ((2, 0), (1, 4), (2, 6))]  # as the stages do
    local = [[0, 1, 2], [3]], [[0, 1]], [[0, 1, 2, 3], [4]]  # indices from each part's first
    assert [[[i for i, _ in batch] for batch in part] for part in parts] == list(local)
    pids = {pid for part in parts for batch in part for _, pid in batch}
    assert pids == {os.getpid()} if not num_workers else (os.getpid() not in pids and len(pids) <= num_workers)
    assert list(stream) == []
    stream = prefetch_groups(groups, _pid, num_workers=num_workers)
    assert [i for i, _ in next(stream)] == [0, 1, 2]
    stream.close()  # the parts are done (or one failed): the workers stop
    assert list(stream) == []


def test_prefetch_groups_needs_items_in_every_group_and_starts_nothing_for_none():
    with pytest.raises(ValueError, match="every group"):
        prefetch_groups([[0], []], _pid, num_workers=2)
    assert list(prefetch_groups([], _pid, num_workers=2)) == []
