"""pipeline.geometry.disk: the disk coordinates of the evaluate stage's picture, read by blocks."""

import numpy as np
import pytest
import zarr

from pipeline.geometry.disk import disk_coordinates


def whole_array_reference(x: np.ndarray, c: float, seed: int = 0) -> np.ndarray:
    """The coordinates computed on the whole array at once (what the blocks must reproduce)."""
    x = np.asarray(x, dtype=np.float64) * np.sqrt(c)
    if x.shape[1] == 2:
        return x
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred[np.random.default_rng(seed).permutation(len(x))[:20000]], full_matrices=False)
    direction = (centred[:, None, :] * vt[:2][None]).sum(-1)  # a product whose bits depend on no BLAS kernel
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    return direction * norm


@pytest.mark.parametrize("n, d, block_rows", [(30_000, 9, 4096), (25_000, 16, None), (700, 2, 64), (3, 5, 1)])
def test_disk_coordinates_by_blocks_equal_the_whole_array_bit_for_bit(tmp_path, n, d, block_rows):
    x = (np.random.default_rng(n).normal(size=(n, d)) * 0.2).astype(np.float32)
    stored = zarr.create_array(tmp_path / "x.zarr", shape=x.shape, chunks=(1000, d), dtype=x.dtype)
    stored[...] = x
    expected = whole_array_reference(x, c=0.5)
    assert np.array_equal(disk_coordinates(x, c=0.5, block_rows=block_rows), expected)
    assert np.array_equal(disk_coordinates(stored, c=0.5, block_rows=block_rows), expected)
    radius = np.linalg.norm(expected, axis=1)
    assert np.allclose(radius, np.linalg.norm(x.astype(np.float64), axis=1) * np.sqrt(0.5))  # the norm is kept
