"""`pipeline.models.inference.prefetch`: the same batches in the same order with and without workers."""

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models.inference import prefetch


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
