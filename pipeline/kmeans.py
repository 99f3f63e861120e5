"""Hyperbolic k-means in the Poincaré ball of curvature -c (float64 throughout), with faiss for the assignment.

Assignment. On the hyperboloid ``dist(x, m) = arcosh(-c <z(x), z(m)>_L) / sqrt(c)``, so the nearest centroid is
the one with the largest Minkowski product ``<z(x), z(m)>_L = -x_0 m_0 + sum x_i m_i``: an inner-product search
with the query's time coordinate negated. Queries are scaled to unit Euclidean norm (the ranking of one query
does not change; the float32 values stay bounded), centroids cannot be (that would change the ranking). A faiss
``IndexFlatIP`` (float32, GPU when available) returns the top ``candidates`` centroids of every point; those are
re-ranked with the exact float64 closed-form distance (`pipeline.hyperbolic.dist`). The result is then
*certified*: a centroid outside the candidates has a computed product at most ``f_k`` (the k-th best), hence
an exact product at most ``f_k + E``, with ``E`` the float32 error bound ``2 (d + 5) 2^-24 max_j |z(m_j)|``
(plus float64 representation terms). A row whose best exact product does not beat ``f_k + E`` is recomputed by
`assign_exact` (blocked float64 brute force). The assignment is therefore that of the float64 closed form,
except for ties at float64 resolution (ties go to the lowest centroid index).

Limit: ``|z(m)| ~ 2 / (1 - sqrt(c)|m|)`` grows as centroids approach the boundary and ``E`` with it, so the
share of rows that fall back to the exact (slow, ``O(N K d)``) path grows when centroids sit at
``1 - sqrt(c)|m| <~ 1e-3`` (dist0 >~ 7.6) and the nearest centroids are close in distance; the count is logged
(and reported through ``stats``). The certificate assumes IEEE float32 GEMM (faiss' default; not TF32/float16).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline import hyperbolic as hyp
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_U32 = 2.0**-24
_U64 = 2.0**-53
_BLOCK = 1 << 22  # elements of a float64 temporary (32 MB)


@dataclass
class KMeansResult:
    """Outcome of a k-means run; ``distance`` is to the point's own centroid (hyperbolic or Euclidean)."""

    assignment: np.ndarray  # (N,) int32
    distance: np.ndarray  # (N,) float64
    centroids: np.ndarray  # (K, d) float64
    inertia: float  # sum of squared distances
    iterations: int  # centroid updates done
    converged: bool  # relative inertia change fell below tol


# ---------------------------------------------------------------------------------------------- validation


def _check_points(x: Any, c: float | None) -> np.ndarray:
    """Float64 C-contiguous (N, d) copy/view of ``x``; one-line PipelineError on bad shape, NaN/inf, or (when
    ``c`` is given) points on or outside the ball ``|x| >= 1/sqrt(c)``."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1 or x.dtype.kind not in "fiu":
        raise PipelineError(f"embeddings must be a numeric (N, d) array, got shape {x.shape} dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise PipelineError(f"{bad.size} embeddings contain NaN or inf (first at index {bad[0]})")
    if c is not None:
        if not (math.isfinite(c) and c > 0):
            raise PipelineError(f"curvature c must be a positive number, got {c}")
        r = math.sqrt(c) * np.linalg.norm(x, axis=1)
        out = np.flatnonzero(r >= 1)
        if out.size:
            raise PipelineError(
                f"{out.size} embeddings lie on or outside the Poincaré ball |x| < 1/sqrt(c) = {1 / math.sqrt(c):.6g} "
                f"(first at index {out[0]}, |x| = {r[out[0]] / math.sqrt(c):.17g})"
            )
    return x


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise PipelineError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise PipelineError(f"k = {k} is larger than the number of points ({n})")


# ------------------------------------------------------------------------------------------------- geometry


def _den_gap(x: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """``D(x) = (1 - r)(1 + r)`` and the gap ``1 - r`` with ``r = sqrt(c)|x|`` (as pipeline.hyperbolic)."""
    r = math.sqrt(c) * np.linalg.norm(x, axis=1)
    gap = np.maximum(1 - r, np.finfo(np.float64).eps / 2)
    return gap * (1 + r), gap


def _lorentz(x: np.ndarray, c: float, den: np.ndarray, out: np.ndarray, sign0: float) -> np.ndarray:
    """Write ``(sign0 * z_0, z_{1:})`` of ``x`` into ``out`` (any float dtype) blockwise; return ``|z|`` (float64)."""
    sc = math.sqrt(c)
    n2 = np.einsum("ij,ij->i", x, x)
    z0 = (1 + c * n2) / (sc * den)
    znorm = np.sqrt(z0 * z0 + 4 * n2 / (den * den))
    step = max(1, _BLOCK // (x.shape[1] + 1))
    for i in range(0, len(x), step):
        s = slice(i, i + step)
        out[s, 0] = sign0 * z0[s]
        out[s, 1:] = x[s] * (2 / den[s])[:, None]
    return znorm


def _arg(diff2: np.ndarray, den_x: np.ndarray, den_m: np.ndarray, c: float) -> np.ndarray:
    """``sqrt(c)|x - m| / sqrt(D(x) D(m))``; the distance is ``2/sqrt(c) asinh(arg)`` (monotone in arg)."""
    return math.sqrt(c) * np.sqrt(diff2) / (np.sqrt(den_x) * np.sqrt(den_m))


def assign_exact(x: np.ndarray, centroids: np.ndarray, c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by brute force in float64 with the closed-form distance (direct differences, blocked):
    ``(assignment int32 (N,), distance float64 (N,))``. Exact reference; ``O(N K d)``. Ties: lowest index."""
    x = _check_points(x, c)
    centroids = _check_points(centroids, c)
    assignment, arg = _assign_exact(x, _den_gap(x, c)[0], centroids, _den_gap(centroids, c)[0], c)
    return assignment, (2 / math.sqrt(c)) * np.arcsinh(arg)


def _assign_exact(
    x: np.ndarray, den_x: np.ndarray, cent: np.ndarray, den_m: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """Blocked brute force: ``(assignment, arg)`` with ``arg`` as in `_arg` (distance = 2/sqrt(c) asinh(arg))."""
    k, d = cent.shape
    assignment = np.empty(len(x), dtype=np.int32)
    arg = np.empty(len(x))
    step = max(1, _BLOCK // (k * d))
    for i in range(0, len(x), step):
        s = slice(i, i + step)
        diff = x[s, None, :] - cent[None]
        a = _arg(np.einsum("ijk,ijk->ij", diff, diff), den_x[s, None], den_m[None], c)
        j = a.argmin(axis=1)
        assignment[s] = j
        arg[s] = a[np.arange(len(j)), j]
    return assignment, arg


def faiss_backend() -> str:
    """Which faiss runs here: "gpu" when faiss sees a GPU (faiss-gpu with CUDA), else "cpu"; with its version."""
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return f"faiss {faiss.__version__} on {'gpu' if n_gpus > 0 else 'cpu'}"


class _Faiss:
    """Builds flat inner-product indexes on the CPU or one GPU; says which at creation."""

    def __init__(self, use_gpu: bool | None) -> None:
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu and n_gpus == 0:
            raise PipelineError("use_gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
        self.gpu = n_gpus > 0 and use_gpu is not False
        self.res = faiss.StandardGpuResources() if self.gpu else None
        self.name = "gpu" if self.gpu else "cpu"
        log.info("faiss %s on %s", faiss.__version__, self.name)

    def search(self, queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = faiss.IndexFlatIP(base.shape[1])
        if self.gpu:
            index = faiss.index_cpu_to_gpu(self.res, 0, index)
        index.add(base)
        return index.search(queries, k)


class _Assigner:
    """Per-point data kept across Lloyd iterations: ball coordinates, D(x), float32 unit hyperboloid queries."""

    def __init__(self, x: np.ndarray, c: float, engine: _Faiss, candidates: int) -> None:
        self.x, self.c, self.engine, self.candidates = x, c, engine, candidates
        self.den, self.gap = _den_gap(x, c)
        self.q = np.empty((len(x), x.shape[1] + 1), dtype=np.float32)
        # queries scaled to unit norm: (-z_0, z_{1:}) / |z|
        self.qnorm = _lorentz(x, c, self.den, self.q, -1.0)
        step = max(1, _BLOCK // self.q.shape[1])
        for i in range(0, len(x), step):
            self.q[i : i + step] /= self.qnorm[i : i + step, None].astype(np.float32)
        self.fallback = 0

    def __call__(self, cent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, c = self.x, self.c
        k, d = cent.shape
        den_m, gap_m = _den_gap(cent, c)
        kk = min(max(self.candidates, 2), k)  # one candidate would leave the certificate nothing to compare with
        base = np.empty((k, d + 1), dtype=np.float64)
        bnorm = _lorentz(cent, c, den_m, base, 1.0)
        f, cand = self.engine.search(self.q, base.astype(np.float32), kk)
        cand = np.sort(cand, axis=1)  # ties go to the lowest index, as in assign_exact
        assignment = np.empty(len(x), dtype=np.int32)
        arg = np.empty(len(x))
        step = max(1, _BLOCK // (kk * d))
        for i in range(0, len(x), step):
            s = slice(i, i + step)
            cs = cand[s]
            diff = x[s, None, :] - cent[cs]
            a = _arg(np.einsum("ijk,ijk->ij", diff, diff), self.den[s, None], den_m[cs], c)
            j = a.argmin(axis=1)
            rows = np.arange(len(j))
            assignment[s] = cs[rows, j]
            arg[s] = a[rows, j]
        if kk < k:
            # certify: exact product of the best candidate must beat every outside centroid's upper bound
            t_best = -(1 + 2 * arg * arg) / (c * self.qnorm)
            big = bnorm.max()
            err = (
                2 * (d + 5) * _U32 * big
                + 16 * _U64 * big / gap_m.min()
                + np.abs(t_best) * _U64 * (16 + 4 / self.gap + 4 / gap_m[assignment])
            )
            todo = np.flatnonzero(~(t_best > f[:, kk - 1].astype(np.float64) + err))
            self.fallback = todo.size
            if todo.size:
                log.debug("exact fallback for %d of %d points", todo.size, len(x))
                assignment[todo], arg[todo] = _assign_exact(x[todo], self.den[todo], cent, den_m, c)
        else:
            self.fallback = 0
        return assignment, (2 / math.sqrt(c)) * np.arcsinh(arg)


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    c: float = 1.0,
    candidates: int = 4,
    *,
    use_gpu: bool | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point through faiss (float32 candidates, float64 re-rank, certified, exact
    fallback; see the module doc): ``(assignment int32 (N,), distance float64 (N,))``, equal to `assign_exact`.

    ``stats``, when given, receives ``{"fallback": rows recomputed exactly, "faiss": "cpu" | "gpu"}``.
    """
    x = _check_points(x, c)
    centroids = _check_points(centroids, c)
    if x.shape[1] != centroids.shape[1]:
        raise PipelineError(f"points have dimension {x.shape[1]} but centroids {centroids.shape[1]}")
    if len(centroids) == 0:
        raise PipelineError("no centroids")
    engine = _Faiss(use_gpu)
    assigner = _Assigner(x, c, engine, candidates)
    out = assigner(centroids)
    if stats is not None:
        stats.update(fallback=assigner.fallback, faiss=engine.name)
    return out


# --------------------------------------------------------------------------------------------------- k-means


def _kmeans_pp(x: np.ndarray, den: np.ndarray, k: int, c: float, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (probability proportional to squared hyperbolic distance to the nearest seed)."""
    n = len(x)
    first = int(rng.integers(n))
    chosen = [first]
    d2 = np.full(n, np.inf)
    for _ in range(k - 1):
        m = chosen[-1]
        diff = x - x[m]
        arg = _arg(np.einsum("ij,ij->i", diff, diff), den, den[m], c)
        np.minimum(d2, ((2 / math.sqrt(c)) * np.arcsinh(arg)) ** 2, out=d2)
        total = d2.sum()
        if total > 0:
            nxt = int(rng.choice(n, p=d2 / total))
        else:  # fewer distinct points than k: any unused point
            unused = np.setdiff1d(np.arange(n), chosen)
            nxt = int(rng.choice(unused))
        chosen.append(nxt)
    return x[np.asarray(chosen)].copy()


def _reseed_empty(assignment: np.ndarray, distance: np.ndarray, k: int) -> int:
    """Give every empty cluster the farthest point (from its centroid) of a cluster that keeps other points;
    ``assignment``/``distance`` are updated in place. Returns the number of clusters re-seeded."""
    counts = np.bincount(assignment, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if not empty.size:
        return 0
    it = iter(empty)
    target = next(it)
    for p in np.argsort(-distance, kind="stable"):
        g = assignment[p]
        if counts[g] <= 1:
            continue
        counts[g] -= 1
        counts[target] = 1
        assignment[p] = target
        distance[p] = 0.0
        target = next(it, None)
        if target is None:
            break
    log.debug("re-seeded %d empty clusters", empty.size)
    return int(empty.size)


def _update(x: np.ndarray, assignment: np.ndarray, k: int, c: float, centroid: str, old: np.ndarray) -> np.ndarray:
    if centroid == "einstein":
        new = hyp.einstein_midpoint(x, c=c, groups=assignment, n_groups=k)
    else:
        new = hyp.frechet_mean(x, c=c, groups=assignment, n_groups=k)
    keep = ~np.isfinite(new).all(axis=1)  # empty clusters keep their centroid
    new[keep] = old[keep]
    return new


def hyperbolic_kmeans(
    x: np.ndarray,
    k: int,
    *,
    c: float = 1.0,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-6,
    centroid: str = "einstein",
    progress: bool = False,
    use_gpu: bool | None = None,
    candidates: int = 4,
    init_size: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means in the Poincaré ball of curvature -c, float64.

    k-means++ seeding with hyperbolic distances on at most ``init_size`` points (default ``max(8k, 10000)``)
    drawn with ``np.random.default_rng(seed)``; then iterations of: re-seed empty clusters (the farthest point of
    a cluster that keeps others), centroid update (``"einstein"``: Einstein midpoint, ``"frechet"``: Fréchet mean),
    exact nearest-centroid assignment (`assign`). Stops when the relative inertia change is ``< tol`` (and no
    cluster was re-seeded) or after ``max_iter`` updates. The returned assignment/distances are those of the
    returned centroids. ``use_gpu``: None = GPU faiss when available, False = CPU, True = GPU or error.
    ``progress`` logs every iteration at INFO (else DEBUG).
    """
    x = _check_points(x, c)
    _check_k(k, len(x))
    if centroid not in ("einstein", "frechet"):
        raise PipelineError(f"centroid must be 'einstein' or 'frechet', got {centroid!r}")
    if max_iter < 0:
        raise PipelineError(f"max_iter must be >= 0, got {max_iter}")
    level = logging.INFO if progress else logging.DEBUG
    rng = np.random.default_rng(seed)
    engine = _Faiss(use_gpu)
    assign_ = _Assigner(x, c, engine, candidates)

    t0 = time.perf_counter()
    size = min(len(x), init_size or max(8 * k, 10_000))
    sample = np.sort(rng.choice(len(x), size=size, replace=False)) if size < len(x) else np.arange(len(x))
    cent = _kmeans_pp(x[sample], assign_.den[sample], k, c, rng)
    assignment, distance = assign_(cent)
    inertia = float(np.dot(distance, distance))
    log.log(level, "k-means++ (k=%d, %d points) in %.2fs, inertia %.6g", k, size, time.perf_counter() - t0, inertia)

    converged, iterations = False, 0
    while iterations < max_iter:
        t0 = time.perf_counter()
        reseeded = _reseed_empty(assignment, distance, k)
        cent = _update(x, assignment, k, c, centroid, cent)
        iterations += 1
        assignment, distance = assign_(cent)
        new = float(np.dot(distance, distance))
        change = abs(inertia - new) / inertia if inertia > 0 else 0.0
        log.log(
            level,
            "iteration %d: inertia %.6g (change %.2e), %d re-seeded, %d exact fallbacks, %.2fs",
            iterations,
            new,
            change,
            reseeded,
            assign_.fallback,
            time.perf_counter() - t0,
        )
        inertia = new
        if reseeded == 0 and change < tol:
            converged = True
            break
    return KMeansResult(assignment, distance, cent, inertia, iterations, converged)


def euclidean_kmeans(
    x: np.ndarray,
    k: int,
    seed: int = 0,
    max_iter: int = 100,
    *,
    tol: float = 1e-6,
    use_gpu: bool | None = None,
) -> KMeansResult:
    """Euclidean k-means with ``faiss.Kmeans`` (k-means++ seeding as the hyperbolic one, seeded, all points used,
    float32 inside); centroids, distances and inertia are returned in float64. faiss runs at most ``max_iter``
    iterations; ``converged`` says whether its objective changed by less than ``tol`` (relative) in the last one."""
    x = _check_points(x, None)
    _check_k(k, len(x))
    engine = _Faiss(use_gpu)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=max(1, max_iter),
        seed=seed,
        gpu=engine.gpu,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-len(x) // k)),
    )
    km.cp.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS  # faiss' default random init misses clusters
    x32 = x.astype(np.float32)
    km.train(x32)
    cent = km.centroids.astype(np.float64)
    _, nearest = km.index.search(x32, 1)
    assignment = nearest[:, 0].astype(np.int32)
    distance = np.linalg.norm(x - cent[assignment], axis=1)
    obj = np.asarray(km.obj, dtype=np.float64)
    converged = len(obj) >= 2 and abs(obj[-2] - obj[-1]) <= tol * max(abs(obj[-2]), np.finfo(float).tiny)
    return KMeansResult(assignment, distance, cent, float(np.dot(distance, distance)), len(obj), bool(converged))


# ------------------------------------------------------------------------------------------------ choosing k


def inertia_curve(
    x: np.ndarray, ks: list[int], *, geometry: str = "poincare", **kwargs: Any
) -> list[tuple[int, float]]:
    """``[(k, inertia)]`` for every k in ``ks``; ``geometry`` "poincare" (hyperbolic_kmeans, kwargs forwarded) or
    "euclidean" (euclidean_kmeans)."""
    if geometry not in ("poincare", "euclidean"):
        raise PipelineError(f"geometry must be 'poincare' or 'euclidean', got {geometry!r}")
    fn = hyperbolic_kmeans if geometry == "poincare" else euclidean_kmeans
    return [(int(k), fn(x, int(k), **kwargs).inertia) for k in ks]


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


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    geometry: str,
    c: float = 1.0,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-6,
    centroid: str = "einstein",
) -> KMeansResult:
    """`hyperbolic_kmeans` for points of the Poincaré ball, `euclidean_kmeans` (faiss) for Euclidean ones."""
    if geometry == "poincare":
        return hyperbolic_kmeans(x, k, c=c, seed=seed, max_iter=max_iter, tol=tol, centroid=centroid)
    if geometry == "euclidean":
        return euclidean_kmeans(x, k, seed=seed, max_iter=max_iter, tol=tol)
    raise PipelineError(f"geometry must be 'poincare' or 'euclidean', got {geometry!r}")


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
