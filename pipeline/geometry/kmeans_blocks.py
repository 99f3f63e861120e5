"""Points read by blocks of rows, for k-means (kmeans, kmeans_assign, kmeans_update).

Points ``x`` are any (N, d) array that supports ``x.shape`` and row slices ``x[i:j]`` (a numpy array,
or a zarr array that is never read whole): every per-point computation reads one block of rows, converts it to
float64 and keeps nothing of it after the block. Blocks are ``BLOCK_ROWS`` rows (fewer for wide
rows, rounded down to a multiple of a zarr array's chunk length: `rows_per_block`), or the ``block_rows`` a
caller passes. `check_points` validates points (shape, dtype, NaN/inf, inside the ball) block by block, each
block in shares on the assignment's worker threads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.geometry.kmeans_terms import ball_radius

_BLOCK = 1 << 22  # elements of a float64 temporary (32 MB)
BLOCK_ROWS = 65_536  # rows of points per block (at most; see rows_per_block)
_SHARE = 16_384  # rows of a worker's share of a block in check_points, at least


def rows_per_block(x: Any, rows: int | None = None) -> int:
    """Rows per block of ``x``: ``rows`` when given; else ``BLOCK_ROWS``, fewer when a float64 block would
    exceed ``_BLOCK`` elements, rounded down to a multiple of the zarr chunk length along axis 0 (at least one)."""
    if rows is not None:
        if int(rows) < 1:
            raise PipelineError(f"block_rows must be >= 1, got {rows}")
        return int(rows)
    rows = max(1, min(BLOCK_ROWS, _BLOCK // max(1, int(x.shape[1]))))
    chunks = getattr(x, "chunks", None)
    if chunks:
        chunk = max(1, int(chunks[0]))
        rows = max(chunk, rows // chunk * chunk)
    return rows


def blocks(n: int, rows: int) -> Iterator[slice]:
    """Consecutive row slices of ``rows`` rows (the last one shorter) covering ``range(n)``."""
    for i in range(0, n, rows):
        yield slice(i, min(n, i + rows))


def read_block(x: Any, rows: slice) -> np.ndarray:
    """Rows of ``x`` as a float64 C-contiguous numpy array (a view when ``x`` already is one)."""
    return np.ascontiguousarray(x[rows], dtype=np.float64)


def read_rows(x: Any, index: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Rows ``index`` (sorted, unique) of ``x`` as float64, read block by block, never more than a block at once.

    A zarr array is asked for the rows of one block at a time (its chunks that hold them): one selection over the
    whole array would read every shard it touches whole, several at once (zarr's concurrency), and a store's
    shards grow with N up to 128 MB (pipeline.stores.store)."""
    index = np.asarray(index, dtype=np.int64)
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x[index], dtype=np.float64)
    orthogonal = hasattr(x, "get_orthogonal_selection")
    out = np.empty((len(index), x.shape[1]))
    for s in blocks(x.shape[0], rows_per_block(x, rows)):
        lo, hi = np.searchsorted(index, [s.start, s.stop])
        if hi > lo and orthogonal:
            out[lo:hi] = x.get_orthogonal_selection((index[lo:hi], slice(None)))
        elif hi > lo:
            out[lo:hi] = read_block(x, s)[index[lo:hi] - s.start]
    return out


def _check_rows(xb: np.ndarray, c: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``xb`` with NaN or inf, rows on or outside the ball (when ``c`` is given), and those rows' radii."""
    sq = np.einsum("ij,ij->i", xb, xb)  # one pass, no temporary: a NaN or inf makes its row's sum one too
    suspect = np.flatnonzero(~np.isfinite(sq))  # and so does a finite row whose sum overflows
    bad = suspect[~np.isfinite(xb[suspect]).all(axis=1)]
    if c is None:
        return bad, bad[:0], np.empty(0)
    r = math.sqrt(c) * np.sqrt(sq)
    edge = np.flatnonzero(r > 1 - 1e-9)  # within the two norms' ulps of the boundary: decided by the norm
    with np.errstate(over="ignore"):  # a huge finite row: inf, outside
        r[edge] = ball_radius(xb[edge], c)  # the radius D(x) is computed from
    out = np.flatnonzero(r >= 1)
    return bad, out, r[out]


def check_points(x: Any, c: float | None, rows: int | None = None, threads: int = 1) -> Any:
    """``x`` checked block by block (numpy arrays and zarr arrays are returned as they are, anything else through
    ``np.asarray``); one-line PipelineError on a bad shape or dtype, NaN/inf, or (when ``c`` is given) points on
    or outside the ball ``|x| >= 1/sqrt(c)``. ``threads``: workers that check shares of each block."""
    if not (hasattr(x, "shape") and isinstance(getattr(x, "dtype", None), np.dtype) and hasattr(x, "__getitem__")):
        x = np.asarray(x)  # lists, tensors, ...
    shape, dtype = tuple(x.shape), np.dtype(x.dtype)
    if len(shape) != 2 or shape[1] < 1 or dtype.kind not in "fiu":
        raise PipelineError(f"embeddings must be a numeric (N, d) array, got shape {shape} dtype {dtype}")
    if c is not None and not (math.isfinite(c) and c > 0):
        raise PipelineError(f"curvature c must be a positive number, got {c}")
    bad, out, r_out = [], [], []
    with ThreadPoolExecutor(threads) if threads > 1 and shape[0] > _SHARE else contextlib.nullcontext() as pool:
        for s in blocks(shape[0], rows_per_block(x, rows)):
            xb = read_block(x, s)
            shares = list(blocks(len(xb), max(_SHARE, -(-len(xb) // threads))))
            parts = (
                [_check_rows(xb[t], c) for t in shares]
                if pool is None
                else pool.map(lambda t, xb=xb: _check_rows(xb[t], c), shares)
            )
            for t, (b, o, ro) in zip(shares, parts, strict=True):
                bad.append(b + s.start + t.start)
                out.append(o + s.start + t.start)
                r_out.append(ro)
    bad, out, r_out = np.concatenate(bad or [[]]), np.concatenate(out or [[]]), np.concatenate(r_out or [[]])
    if bad.size:
        raise PipelineError(f"{bad.size} embeddings contain NaN or inf (first at index {int(bad[0])})")
    if out.size:
        raise PipelineError(
            f"{out.size} embeddings lie on or outside the Poincaré ball |x| < 1/sqrt(c) = {1 / math.sqrt(c):.6g} "
            f"(first at index {int(out[0])}, |x| = {float(r_out[0]) / math.sqrt(c):.17g})"
        )
    return x
