"""k-means in the Poincaré ball of curvature -c or in Euclidean space: one Lloyd loop, float64, streamed.

Both geometries run the same loop (`_lloyd`); only the geometry differs:

1. k-means++ seeding on at most ``init_size`` points (default ``max(8k, 10000)``, drawn with
   ``np.random.default_rng(seed)``, only those rows read), with squared hyperbolic / Euclidean distances;
2. iterations of: re-seed empty clusters (the farthest point of a cluster that keeps others), centroid update
   (Poincaré: Einstein midpoint or Fréchet mean; Euclidean: mean), nearest-centroid assignment; until the relative
   inertia change is ``< tol`` (and no cluster was re-seeded) or after ``max_iter`` updates.

The assignment (`kmeans_assign`) equals the float64 brute force over every centroid (a float32 GEMM on the CPU,
float64 for rows next to the boundary, faiss float32 on GPUs, all certified, near-ties decided exactly); the
centroid updates (`kmeans_update`) are per-group float64 sums. Points ``x`` may be a numpy array or a zarr array
(anything with ``shape``, ``len`` and row slices): every per-point pass reads blocks of rows, so the memory held
across a run is the outputs (assignment int32 and distance float64, 12 bytes per point), the k-means++ sample
and O(block) temporaries, whatever N is.
The result does not depend on the block size nor on whether ``x`` is a numpy or a zarr array.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.geometry.kmeans_assign import _Assigner, assign, assign_exact
from pipeline.geometry.kmeans_blocks import check_points, read_rows
from pipeline.geometry.kmeans_engines import _Faiss, cuda_devices, faiss_backend, search_name, visible_gpus
from pipeline.geometry.kmeans_terms import Euclidean, Geometry, Poincare, _arg
from pipeline.geometry.kmeans_update import _update

# k-means' public API in one place: the loop and the elbow here, the assignment and the search engine re-exported
__all__ = [
    "KMeansResult",
    "assign",
    "assign_exact",
    "cuda_devices",
    "euclidean_kmeans",
    "faiss_backend",
    "hyperbolic_kmeans",
    "inertia_curve",
    "k_sweep",
    "kmeans",
    "knee",
    "search_name",
    "visible_gpus",
]

log = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    """Outcome of a k-means run; ``distance`` is to the point's own centroid (hyperbolic or Euclidean)."""

    assignment: np.ndarray  # (N,) int32
    distance: np.ndarray  # (N,) float64
    centroids: np.ndarray  # (K, d) float64
    inertia: float  # sum of squared distances
    iterations: int  # centroid updates done
    converged: bool  # relative inertia change fell below tol


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise PipelineError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise PipelineError(f"k = {k} is larger than the number of points ({n})")


# --------------------------------------------------------------------------------------------------- k-means


def _kmeans_pp(x: np.ndarray, den: np.ndarray | None, k: int, c: float | None, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (probability proportional to the squared distance to the nearest seed): hyperbolic with
    ``D(x)`` = ``den`` in curvature -c, Euclidean when ``den`` is None."""
    n = len(x)
    first = int(rng.integers(n))
    chosen = [first]
    d2 = np.full(n, np.inf)
    for _ in range(k - 1):
        m = chosen[-1]
        diff = x - x[m]
        sq = np.einsum("ij,ij->i", diff, diff)
        np.minimum(d2, sq if den is None else ((2 / math.sqrt(c)) * np.arcsinh(_arg(sq, den, den[m], c))) ** 2, out=d2)
        total = d2.sum()
        if total > 0:
            nxt = int(rng.choice(n, p=d2 / total))
        else:  # fewer distinct points than k: any unused point
            unused = np.setdiff1d(np.arange(n), chosen)
            nxt = int(rng.choice(unused))
        chosen.append(nxt)
    return x[np.asarray(chosen)].copy()


def _farthest_first(distance: np.ndarray) -> Iterator[int]:
    """Indices by decreasing distance, ties by increasing index (``np.argsort(-distance, kind="stable")``), sorted
    in growing batches so that the usual few needed cost no N-sized sort (a batch copies the distances once)."""
    n, m, done = len(distance), 64, 0
    while done < n:
        if m >= n:
            order = np.argsort(-distance, kind="stable")
        else:
            top = np.flatnonzero(distance >= np.partition(distance, n - m)[n - m])  # the m largest, with ties
            order = top[np.argsort(-distance[top], kind="stable")]  # a prefix of the full order
        yield from order[done:].tolist()
        done, m = len(order), 4 * m


def _reseed_empty(assignment: np.ndarray, distance: np.ndarray, k: int) -> int:
    """Give every empty cluster the farthest point (from its centroid) of a cluster that keeps other points;
    ``assignment``/``distance`` are updated in place. Returns the number of clusters re-seeded."""
    counts = np.bincount(assignment, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if not empty.size:
        return 0
    moves = []
    targets = iter(empty)
    target = next(targets)
    for p in _farthest_first(distance):
        g = assignment[p]
        if counts[g] <= 1:
            continue
        counts[g] -= 1
        counts[target] = 1
        moves.append((p, target))
        target = next(targets, None)
        if target is None:
            break
    for p, target in moves:  # after the walk, which reads the distances as they were
        assignment[p] = target
        distance[p] = 0.0
    log.debug("re-seeded %d empty clusters", empty.size)
    return int(empty.size)


def _lloyd(
    x: Any,
    k: int,
    geom: Geometry,
    centroid: str,
    *,
    seed: int,
    max_iter: int,
    tol: float,
    progress: bool,
    use_gpu: bool | None,
    gpu_devices: list[int] | None,
    candidates: int,
    init_size: int | None,
    block_rows: int | None,
) -> KMeansResult:
    """The Lloyd loop of both geometries (see the module doc); ``x`` already checked."""
    _check_k(k, x.shape[0])
    if max_iter < 0:
        raise PipelineError(f"max_iter must be >= 0, got {max_iter}")
    level = logging.INFO if progress else logging.DEBUG
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    assign_ = _Assigner(x, geom, _Faiss(use_gpu, gpu_devices), candidates, block_rows=block_rows)

    t0 = time.perf_counter()
    size = min(n, init_size or max(8 * k, 10_000))
    sample = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    xs = read_rows(x, sample, assign_.rows)
    cent = _kmeans_pp(xs, geom.seed_den(xs), k, geom.c, rng)
    del xs
    assignment, distance = assign_(cent)
    inertia = float(np.dot(distance, distance))
    log.log(level, "k-means++ (k=%d, %d points) in %.2fs, inertia %.6g", k, size, time.perf_counter() - t0, inertia)

    converged, iterations = False, 0
    while iterations < max_iter:
        t0 = time.perf_counter()
        reseeded = _reseed_empty(assignment, distance, k)
        cent = _update(x, assignment, k, geom.c, centroid, cent, block_rows=assign_.rows)
        iterations += 1
        assign_(cent, out=(assignment, distance))
        new = float(np.dot(distance, distance))
        change = abs(inertia - new) / inertia if inertia > 0 else 0.0
        log.log(
            level,
            "iteration %d: inertia %.6g (change %.2e), %d re-seeded, %d redone in float64, %d near-tie rows, %.2fs",
            iterations,
            new,
            change,
            reseeded,
            assign_.redone,
            assign_.fallback,
            time.perf_counter() - t0,
        )
        inertia = new
        if reseeded == 0 and change < tol:
            converged = True
            break
    return KMeansResult(assignment, distance, cent, inertia, iterations, converged)


def hyperbolic_kmeans(
    x: Any,
    k: int,
    *,
    c: float = 1.0,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-6,
    centroid: str = "einstein",
    progress: bool = False,
    use_gpu: bool | None = None,
    gpu_devices: list[int] | None = None,
    candidates: int = 4,
    init_size: int | None = None,
    block_rows: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means in the Poincaré ball of curvature -c, float64 (the loop of the module doc).

    ``centroid``: ``"einstein"`` (Einstein midpoint) or ``"frechet"`` (Fréchet mean). The returned
    assignment/distances are those of the returned centroids. ``use_gpu``: None = GPU faiss when available,
    False = CPU, True = GPU or error; ``gpu_devices``: the GPU ids faiss uses (default every visible one).
    ``progress`` logs every iteration at INFO (else DEBUG). ``block_rows``: rows per block of ``x`` (default
    `pipeline.geometry.kmeans_blocks.rows_per_block`); the result does not depend on it nor on the threads or GPUs.
    """
    if centroid not in ("einstein", "frechet"):
        raise PipelineError(f"centroid must be 'einstein' or 'frechet', got {centroid!r}")
    x = check_points(x, c, block_rows)
    return _lloyd(
        x,
        k,
        Poincare(c),
        centroid,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        progress=progress,
        use_gpu=use_gpu,
        gpu_devices=gpu_devices,
        candidates=candidates,
        init_size=init_size,
        block_rows=block_rows,
    )


def euclidean_kmeans(
    x: Any,
    k: int,
    seed: int = 0,
    max_iter: int = 100,
    *,
    tol: float = 1e-6,
    progress: bool = False,
    use_gpu: bool | None = None,
    gpu_devices: list[int] | None = None,
    candidates: int = 4,
    init_size: int | None = None,
    block_rows: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means in Euclidean space, float64: the loop of `hyperbolic_kmeans` (same seeding on the same
    sample, re-seeding, stopping rule, certified assignment) with squared Euclidean distances and the mean."""
    x = check_points(x, None, block_rows)
    return _lloyd(
        x,
        k,
        Euclidean(),
        "mean",
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        progress=progress,
        use_gpu=use_gpu,
        gpu_devices=gpu_devices,
        candidates=candidates,
        init_size=init_size,
        block_rows=block_rows,
    )


# ------------------------------------------------------------------------------------------------ choosing k


def kmeans(x: Any, k: int, *, geometry: str, c: float = 1.0, centroid: str = "einstein", **kwargs: Any) -> KMeansResult:
    """`hyperbolic_kmeans` for points of the Poincaré ball, `euclidean_kmeans` for Euclidean ones (``c`` and
    ``centroid`` unused); ``kwargs`` (seed, max_iter, tol, use_gpu, block_rows, ...) forwarded."""
    if geometry == "poincare":
        return hyperbolic_kmeans(x, k, c=c, centroid=centroid, **kwargs)
    if geometry == "euclidean":
        return euclidean_kmeans(x, k, **kwargs)
    raise PipelineError(f"geometry must be 'poincare' or 'euclidean', got {geometry!r}")


def inertia_curve(x: Any, ks: list[int], *, geometry: str = "poincare", **kwargs: Any) -> list[tuple[int, float]]:
    """``[(k, inertia)]`` for every k in ``ks`` (`kmeans` with ``geometry`` and ``kwargs``); only the inertias are
    kept, each run's arrays are dropped before the next."""
    if geometry not in ("poincare", "euclidean"):
        raise PipelineError(f"geometry must be 'poincare' or 'euclidean', got {geometry!r}")
    return [(int(k), kmeans(x, int(k), geometry=geometry, **kwargs).inertia) for k in ks]


def knee(ks: Any, inertias: Any) -> int:
    """Elbow of an inertia curve by the Kneedle rule: on axes normalised to [0, 1], the k farthest from the chord
    joining the first and last points (k sorted ascending; ties to the smallest k)."""
    ks = np.asarray(ks, dtype=np.float64)
    y = np.asarray(inertias, dtype=np.float64)
    if ks.ndim != 1 or ks.shape != y.shape or len(ks) < 3:
        raise PipelineError(f"knee needs at least 3 (k, inertia) pairs of equal length, got {ks.shape}, {y.shape}")
    if not (np.isfinite(ks).all() and np.isfinite(y).all()):
        raise PipelineError("knee needs finite k and inertia values")
    order = np.argsort(ks, kind="stable")
    ks, y = ks[order], y[order]
    xs = (ks - ks[0]) / (ks[-1] - ks[0]) if ks[-1] > ks[0] else np.zeros_like(ks)
    span = y.max() - y.min()
    ys = (y - y.min()) / span if span > 0 else np.zeros_like(y)
    dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
    dist = np.abs(dy * (xs - xs[0]) - dx * (ys - ys[0])) / max(math.hypot(dx, dy), np.finfo(float).tiny)
    return int(ks[int(np.argmax(dist))])


def k_sweep(k_range: list[int], n_points: int) -> list[int]:
    """The k of `k_range` = [start, stop (inclusive), step] that do not exceed the number of points."""
    if len(k_range) != 3 or k_range[0] < 1 or k_range[2] < 1 or k_range[1] < k_range[0]:
        raise PipelineError(f"cluster.k_range must be [start >= 1, stop >= start, step >= 1], got {k_range}")
    ks = [k for k in range(k_range[0], k_range[1] + 1, k_range[2]) if k <= n_points]
    if len(ks) < 3:
        raise PipelineError(
            f"cluster.k_range {k_range} leaves {len(ks)} values of k <= the {n_points} points; the elbow needs 3"
        )
    return ks
