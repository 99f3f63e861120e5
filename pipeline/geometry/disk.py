"""2-D coordinates of points of the Poincaré ball for a picture of the unit disk (the evaluate stage's plot):
each point keeps its distance to the origin, its direction comes from the first two principal components."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.geometry.kmeans_blocks import blocks, read_block, read_rows, rows_per_block


def _project(rows: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """(n, d) rows onto (k, d) axes, each row summed on its own: the bits do not depend on how many rows come
    at once (a BLAS product may pick another kernel for another shape, and did on one Intel CPU)."""
    return (rows[:, None, :] * axes[None, :, :]).sum(axis=-1)


def disk_coordinates(x: Any, c: float = 1.0, seed: int = 0, block_rows: int | None = None) -> np.ndarray:
    """2-D points of the unit disk for (N, d) points of the ball of curvature c (a numpy or zarr array).

    d == 2: the points themselves, scaled to the unit disk. d > 2: each point keeps its distance to the
    origin (its norm) and gets the direction of its first two principal components (directions normalised),
    so how deep a point sits in the hierarchy is read off exactly. The components come from a seeded sample of
    20,000 points; ``x`` is read block by block (two passes), so memory is a block plus the (N, 2) result.
    """
    sc = np.sqrt(c)
    n, d = x.shape
    step = rows_per_block(x, block_rows)
    if d == 2:
        return np.concatenate([read_block(x, s) * sc for s in blocks(n, step)] or [np.zeros((0, 2))])
    total = np.zeros(d)
    for s in blocks(n, step):  # row after row into one sum: the bits of x.mean(axis=0)
        total = np.add.reduce(np.concatenate([total[None], read_block(x, s) * sc]), axis=0)
    mean = total / n
    sample = np.random.default_rng(seed).permutation(n)[:20000]
    order = np.argsort(sample)
    rows = np.empty((len(sample), d))
    rows[order] = read_rows(x, sample[order], block_rows) * sc
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    out = np.empty((n, 2))
    for s in blocks(n, step):
        xs = read_block(x, s) * sc
        direction = _project(xs - mean, vt[:2])
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
        out[s] = direction * np.linalg.norm(xs, axis=1, keepdims=True)
    return out
