"""Nearest-centroid assignment of k-means (pipeline.kmeans), streamed by blocks of rows, in both geometries.

Points ``x`` are any (N, d) array that supports ``x.shape`` and row slices ``x[i:j]`` (a numpy array,
or a zarr array that is never read whole): every per-point computation reads one block of rows, converts it to
float64 and keeps nothing of it after the block. Blocks are ``BLOCK_ROWS`` rows (fewer for wide
rows, rounded down to a multiple of a zarr array's chunk length: `rows_per_block`), or the ``block_rows`` a
caller passes. The result does not depend on the block size.

Both geometries are the same maximum-inner-product search plus a float64 re-rank:

- Poincaré ball of curvature -c: on the hyperboloid ``dist(x, m) = arcosh(-c <z(x), z(m)>_L) / sqrt(c)``, so the
  nearest centroid has the largest Minkowski product ``-x_0 m_0 + sum x_i m_i``: queries ``(-z_0, z_{1:})``
  scaled to unit norm (the ranking of a query does not change; float32 values stay bounded), base ``z(m)``.
  Re-rank value: ``sqrt(c)|x - m| / sqrt(D(x) D(m))`` (distance ``2/sqrt(c) asinh`` of it).
- Euclidean: ``|x - m|^2 = |x'|^2 - 2 (x'.m' - |m'|^2 / 2)`` with ``x' = x - mu``, ``m' = m - mu`` (``mu`` the
  centroids' mean), so queries ``(x', s) / |(x', s)|`` and base ``(m', -|m'|^2 / (2 s))``, ``s = max |m'|``.
  Re-rank value: the direct float64 ``sum (x_i - m_i)^2`` (distance its square root).

A faiss ``IndexFlatIP`` (float32, GPU when available) gives every point its top ``candidates`` centroids (at
least 2); they are re-ranked with the float64 value. The result is then *certified*: a centroid outside the
candidates has a computed product at most ``f_k`` (the k-th best), hence an exact product at most ``f_k + E``,
``E = 2 (d + 5) 2^-24 max_j |base_j|`` the float32 error bound of a unit query (plus float64 terms). A row whose
best candidate does not beat that bound is recomputed by the blocked float64 brute force over every centroid
(`assign_exact`). The assignment is therefore that of the float64 value over all centroids, ties to the lowest
centroid index; when every centroid is a candidate (``k <= candidates``) the brute force runs directly.

Limit (Poincaré): ``|z(m)| ~ 2 / (1 - sqrt(c)|m|)`` grows as centroids approach the boundary and ``E`` with it, so
the share of rows that fall back to the exact (slow, ``O(N K d)``) path grows when centroids sit at
``1 - sqrt(c)|m| <~ 1e-3`` (dist0 >~ 7.6) and the nearest centroids are close in distance; the count is logged
(and reported through ``stats``). The certificate assumes IEEE float32 GEMM (faiss' default; not TF32/float16).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import faiss
import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_U32 = 2.0**-24
_U64 = 2.0**-53
_BLOCK = 1 << 22  # elements of a float64 temporary (32 MB)
BLOCK_ROWS = 65_536  # rows of points per block (at most; see rows_per_block)


# ------------------------------------------------------------------------------------------------- blocks


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
    """Rows ``index`` (sorted, unique) of ``x`` as float64, read without loading ``x`` whole."""
    index = np.asarray(index, dtype=np.int64)
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x[index], dtype=np.float64)
    if hasattr(x, "get_orthogonal_selection"):  # zarr: only the chunks that hold the rows
        return np.ascontiguousarray(x.get_orthogonal_selection((index, slice(None))), dtype=np.float64)
    out = np.empty((len(index), x.shape[1]))
    for s in blocks(x.shape[0], rows_per_block(x, rows)):
        lo, hi = np.searchsorted(index, [s.start, s.stop])
        if hi > lo:
            out[lo:hi] = read_block(x, s)[index[lo:hi] - s.start]
    return out


def check_points(x: Any, c: float | None, rows: int | None = None) -> Any:
    """``x`` checked block by block (numpy arrays and zarr arrays are returned as they are, anything else through
    ``np.asarray``); one-line PipelineError on a bad shape or dtype, NaN/inf, or (when ``c`` is given) points on
    or outside the ball ``|x| >= 1/sqrt(c)``."""
    if not (hasattr(x, "shape") and isinstance(getattr(x, "dtype", None), np.dtype) and hasattr(x, "__getitem__")):
        x = np.asarray(x)  # lists, tensors, ...
    shape, dtype = tuple(x.shape), np.dtype(x.dtype)
    if len(shape) != 2 or shape[1] < 1 or dtype.kind not in "fiu":
        raise PipelineError(f"embeddings must be a numeric (N, d) array, got shape {shape} dtype {dtype}")
    if c is not None and not (math.isfinite(c) and c > 0):
        raise PipelineError(f"curvature c must be a positive number, got {c}")
    n_bad = n_out = 0
    first_bad = first_out = -1
    r_out = 0.0
    for s in blocks(shape[0], rows_per_block(x, rows)):
        xb = read_block(x, s)
        bad = np.flatnonzero(~np.isfinite(xb).all(axis=1))
        if bad.size and not n_bad:
            first_bad = s.start + int(bad[0])
        n_bad += bad.size
        if c is not None:
            r = math.sqrt(c) * np.linalg.norm(xb, axis=1)
            out = np.flatnonzero(r >= 1)
            if out.size and not n_out:
                first_out, r_out = s.start + int(out[0]), float(r[out[0]])
            n_out += out.size
    if n_bad:
        raise PipelineError(f"{n_bad} embeddings contain NaN or inf (first at index {first_bad})")
    if n_out:
        raise PipelineError(
            f"{n_out} embeddings lie on or outside the Poincaré ball |x| < 1/sqrt(c) = {1 / math.sqrt(c):.6g} "
            f"(first at index {first_out}, |x| = {r_out / math.sqrt(c):.17g})"
        )
    return x


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


def _sq_diff(xb: np.ndarray, cent: np.ndarray, cand: np.ndarray | None) -> np.ndarray:
    """``|x - m|^2`` by direct differences, float64: (b, kk) over the candidates ``cand`` (b, kk), or (b, K)."""
    diff = xb[:, None, :] - (cent[None] if cand is None else cent[cand])
    return np.einsum("ijk,ijk->ij", diff, diff)


class Side(NamedTuple):
    """The centroids' side of one assignment: what the geometry needs, the float32 base and its largest norm."""

    data: tuple[np.ndarray, ...]
    base: np.ndarray  # (K, d + 1) float32
    big: float  # max_j |base_j| (float64)


class Poincare:
    """The Poincaré ball of curvature -c: the pieces of `_Assigner` and of k-means++ seeding."""

    def __init__(self, c: float) -> None:
        self.c = float(c)

    def seed_den(self, xs: np.ndarray) -> np.ndarray:
        return _den_gap(xs, self.c)[0]

    def rows(self, xb: np.ndarray) -> tuple[np.ndarray, ...]:
        return _den_gap(xb, self.c)  # (den, gap)

    def side(self, cent: np.ndarray) -> Side:
        den_m, gap_m = _den_gap(cent, self.c)
        base = np.empty((len(cent), cent.shape[1] + 1), dtype=np.float64)
        bnorm = _lorentz(cent, self.c, den_m, base, 1.0)
        return Side((den_m, gap_m), base.astype(np.float32), float(bnorm.max()))

    def queries(self, xb: np.ndarray, rows: tuple[np.ndarray, ...], side: Side) -> tuple[np.ndarray, tuple]:
        """Unit float32 queries ``(-z_0, z_{1:}) / |z|`` and ``(|z|,)`` for the certificate."""
        q = np.empty((len(xb), xb.shape[1] + 1), dtype=np.float32)
        qnorm = _lorentz(xb, self.c, rows[0], q, -1.0)
        q /= qnorm.astype(np.float32)[:, None]
        return q, (qnorm,)

    def value(self, xb: np.ndarray, rows: tuple, cent: np.ndarray, side: Side, cand: np.ndarray | None) -> np.ndarray:
        den_m = side.data[0][None] if cand is None else side.data[0][cand]
        return _arg(_sq_diff(xb, cent, cand), rows[0][:, None], den_m, self.c)

    def uncertain(
        self, best: np.ndarray, j: np.ndarray, fk: np.ndarray, aux: tuple, rows: tuple, side: Side, d: int
    ) -> np.ndarray:
        """Rows whose best candidate (value ``best``, centroid ``j``) is not certified against ``fk``."""
        c, qnorm, gap, gap_m = self.c, aux[0], rows[1], side.data[1]
        t_best = -(1 + 2 * best * best) / (c * qnorm)  # exact product of the best candidate, unit query
        err = (
            2 * (d + 5) * _U32 * side.big
            + 16 * _U64 * side.big / gap_m.min()
            + np.abs(t_best) * _U64 * (16 + 4 / gap + 4 / gap_m[j])
        )
        return np.flatnonzero(~(t_best > fk + err))

    def distance(self, value: np.ndarray) -> np.ndarray:
        return (2 / math.sqrt(self.c)) * np.arcsinh(value)


class Euclidean:
    """Euclidean space: the pieces of `_Assigner` and of k-means++ seeding (squared distances)."""

    c = None

    def seed_den(self, xs: np.ndarray) -> None:
        return None

    def rows(self, xb: np.ndarray) -> tuple[np.ndarray, ...]:
        return ()

    def side(self, cent: np.ndarray) -> Side:
        mu = cent.mean(axis=0)
        mt = cent - mu
        n2 = np.einsum("ij,ij->i", mt, mt)
        m = float(np.sqrt(n2.max()))
        s = m if m > 0 else 1.0
        base = np.concatenate([mt, (-n2 / (2 * s))[:, None]], axis=1)
        return Side((mu, np.array([m, s])), base.astype(np.float32), float(np.linalg.norm(base, axis=1).max()))

    def queries(self, xb: np.ndarray, rows: tuple[np.ndarray, ...], side: Side) -> tuple[np.ndarray, tuple]:
        """Unit float32 queries ``(x', s) / |(x', s)|`` and ``(|(x', s)|, |x'|^2)`` for the certificate."""
        mu, s = side.data[0], side.data[1][1]
        xt = xb - mu
        xt2 = np.einsum("ij,ij->i", xt, xt)
        qnorm = np.sqrt(xt2 + s * s)
        q = np.empty((len(xb), xb.shape[1] + 1), dtype=np.float32)
        q[:, :-1] = xt / qnorm[:, None]
        q[:, -1] = s / qnorm
        return q, (qnorm, xt2)

    def value(self, xb: np.ndarray, rows: tuple, cent: np.ndarray, side: Side, cand: np.ndarray | None) -> np.ndarray:
        return _sq_diff(xb, cent, cand)

    def uncertain(
        self, best: np.ndarray, j: np.ndarray, fk: np.ndarray, aux: tuple, rows: tuple, side: Side, d: int
    ) -> np.ndarray:
        """Rows whose best candidate (squared distance ``best``) is not certified against ``fk``: an outside
        centroid has ``|x' - m'|^2 >= |x'|^2 - 2 |q| (f_k + E)``; float64 errors are bounded by ``err``."""
        (m, s), (qnorm, xt2) = side.data[1], aux
        scale = np.sqrt(xt2) + m + s
        err = 16 * (d + 4) * _U64 * scale * scale
        bound = xt2 - 2 * qnorm * (fk + 2 * (d + 5) * _U32 * side.big)
        return np.flatnonzero(~(best + err < bound))

    def distance(self, value: np.ndarray) -> np.ndarray:
        return np.sqrt(value)


Geometry = Poincare | Euclidean


def _exact(geom: Geometry, xb: np.ndarray, rows: tuple, cent: np.ndarray, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """Blocked brute force over every centroid: ``(assignment, value)``; ties to the lowest index."""
    k, d = cent.shape
    assignment = np.empty(len(xb), dtype=np.int32)
    value = np.empty(len(xb))
    step = max(1, _BLOCK // (k * d))
    for i in range(0, len(xb), step):
        s = slice(i, i + step)
        v = geom.value(xb[s], tuple(a[s] for a in rows), cent, side, None)
        j = v.argmin(axis=1)
        assignment[s] = j
        value[s] = v[np.arange(len(j)), j]
    return assignment, value


def _rerank(
    geom: Geometry, xb: np.ndarray, rows: tuple, cent: np.ndarray, side: Side, cand: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Best of the (sorted) candidates of every row by the float64 value: ``(assignment, value)``."""
    assignment = np.empty(len(xb), dtype=np.int32)
    value = np.empty(len(xb))
    step = max(1, _BLOCK // (cand.shape[1] * cent.shape[1]))
    for i in range(0, len(xb), step):
        s = slice(i, i + step)
        cs = cand[s]
        v = geom.value(xb[s], tuple(a[s] for a in rows), cent, side, cs)
        j = v.argmin(axis=1)
        r = np.arange(len(j))
        assignment[s] = cs[r, j]
        value[s] = v[r, j]
    return assignment, value


# ---------------------------------------------------------------------------------------------------- faiss


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

    def index(self, base: np.ndarray) -> Any:
        """A flat inner-product index holding ``base`` (float32), searched with ``.search(queries, k)``."""
        index = faiss.IndexFlatIP(base.shape[1])
        if self.gpu:
            index = faiss.index_cpu_to_gpu(self.res, 0, index)
        index.add(np.ascontiguousarray(base, dtype=np.float32))
        return index

    def search(self, queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index(base).search(queries, k)


class _Assigner:
    """Nearest centroid of every row of ``x``, block by block (nothing per point is kept between calls).

    ``geometry``: a `Poincare` / `Euclidean`, or a curvature c (the Poincaré ball). ``fallback``: the rows the
    last call recomputed exactly.
    """

    def __init__(
        self, x: Any, geometry: Geometry | float, engine: _Faiss, candidates: int, *, block_rows: int | None = None
    ) -> None:
        self.geom = geometry if isinstance(geometry, Poincare | Euclidean) else Poincare(float(geometry))
        self.x, self.engine, self.candidates = x, engine, candidates
        self.rows = rows_per_block(x, block_rows)
        self.fallback = 0

    def __call__(
        self, cent: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(assignment int32 (N,), distance float64 (N,))`` to the centroids ``cent``, written into ``out``
        when given."""
        geom, x = self.geom, self.x
        k, d = cent.shape
        n = x.shape[0]
        assignment, distance = out if out is not None else (np.empty(n, dtype=np.int32), np.empty(n))
        side = geom.side(cent)
        kk = min(max(self.candidates, 2), k)  # one candidate would leave the certificate nothing to compare with
        index = self.engine.index(side.base) if kk < k else None
        fallback = 0
        for s in blocks(n, self.rows):
            xb = read_block(x, s)
            rows = geom.rows(xb)
            if index is None:  # every centroid is a candidate
                a, v = _exact(geom, xb, rows, cent, side)
            else:
                q, aux = geom.queries(xb, rows, side)
                f, cand = index.search(q, kk)
                cand = np.sort(cand, axis=1)  # ties go to the lowest index, as in the brute force
                a, v = _rerank(geom, xb, rows, cent, side, cand)
                todo = geom.uncertain(v, a, f[:, kk - 1].astype(np.float64), aux, rows, side, d)
                if todo.size:
                    fallback += todo.size
                    a[todo], v[todo] = _exact(geom, xb[todo], tuple(r[todo] for r in rows), cent, side)
            assignment[s] = a
            distance[s] = geom.distance(v)
        self.fallback = fallback
        if fallback:
            log.debug("exact fallback for %d of %d points", fallback, n)
        return assignment, distance


def _geometry(geometry: str, c: float) -> Geometry:
    if geometry == "poincare":
        return Poincare(c)
    if geometry == "euclidean":
        return Euclidean()
    raise PipelineError(f"geometry must be 'poincare' or 'euclidean', got {geometry!r}")


def assign(
    x: Any,
    centroids: Any,
    c: float = 1.0,
    candidates: int = 4,
    *,
    geometry: str = "poincare",
    use_gpu: bool | None = None,
    stats: dict[str, Any] | None = None,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point through faiss (float32 candidates, float64 re-rank, certified, exact
    fallback; see the module doc): ``(assignment int32 (N,), distance float64 (N,))``, equal to `assign_exact`.
    ``geometry`` "poincare" (curvature -c) or "euclidean" (``c`` unused); ``x`` as in the module doc.

    ``stats``, when given, receives ``{"fallback": rows recomputed exactly, "faiss": "cpu" | "gpu"}``.
    """
    geom = _geometry(geometry, c)
    x = check_points(x, geom.c, block_rows)
    centroids = np.ascontiguousarray(check_points(centroids, geom.c), dtype=np.float64)
    if x.shape[1] != centroids.shape[1]:
        raise PipelineError(f"points have dimension {x.shape[1]} but centroids {centroids.shape[1]}")
    if len(centroids) == 0:
        raise PipelineError("no centroids")
    engine = _Faiss(use_gpu)
    assigner = _Assigner(x, geom, engine, candidates, block_rows=block_rows)
    out = assigner(centroids)
    if stats is not None:
        stats.update(fallback=assigner.fallback, faiss=engine.name)
    return out


def assign_exact(
    x: Any, centroids: Any, c: float = 1.0, *, geometry: str = "poincare", block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by brute force in float64 (direct differences, blocked): ``(assignment int32 (N,),
    distance float64 (N,))``. Exact reference; ``O(N K d)``. Ties: lowest index."""
    geom = _geometry(geometry, c)
    x = check_points(x, geom.c, block_rows)
    centroids = np.ascontiguousarray(check_points(centroids, geom.c), dtype=np.float64)
    side = geom.side(centroids)
    assignment, distance = np.empty(x.shape[0], dtype=np.int32), np.empty(x.shape[0])
    for s in blocks(x.shape[0], rows_per_block(x, block_rows)):
        xb = read_block(x, s)
        assignment[s], v = _exact(geom, xb, geom.rows(xb), centroids, side)
        distance[s] = geom.distance(v)
    return assignment, distance
