"""Nearest-centroid assignment of k-means (pipeline.geometry.kmeans), streamed by blocks of rows, in both geometries.

Points ``x`` are read by blocks of rows as kmeans_blocks describes (a numpy or a zarr array, never read
whole); the search engine (CPU threads, faiss on GPUs) is chosen by kmeans_engines. The result does not
depend on the block size, nor on the number of threads or GPUs.

**The rule.** Every point goes to the centroid of smallest float64 *reference value*, ties to the lowest index:
Poincaré ball of curvature -c: ``sqrt(c)|x - m| / sqrt(D(x) D(m))`` with ``D = (1 - sqrt(c)|.|)(1 + sqrt(c)|.|)``
(the distance is ``2/sqrt(c) asinh`` of it, the same ranking as the closed form ``arcosh(1 + 2c|x-m|^2 / (D(x)
D(m)))``); Euclidean: ``sum (x_i - m_i)^2`` (the distance is its square root); both from direct differences.
`assign_exact` evaluates it over every centroid (``O(N K d)``, the reference).

**The search.** For a fixed point both rankings are that of ``t_j = a_j |x - y_j|^2`` (``a_j = 1 / D(y_j)``; 1 in
Euclidean space). With ``p`` the centroids' mean, ``r = |x - p|``, ``s_j = |y_j - p|``,
``x'' = (x - p, r^2, 1, r)`` and ``y''_j = (-2 a_j (y_j - p), a_j (1 - beta), a_j s_j^2 (1 - beta), -2 beta a_j
s_j)``, one matrix product gives ``x'' . y''_j = t_j - beta a_j (r + s_j)^2``. Computed in a precision of unit
roundoff ``u``, an entry is off by at most ``gamma a_j (r + s_j)^2`` (``gamma``: the GEMM's ``(n + 2) u`` for
``n = d + 3`` terms, in any summation order, plus the rounding of ``x''`` and ``y''``; ``sum_k |x''_k y''_k| <=
a_j (r + s_j)^2`` by Cauchy-Schwarz), so with ``beta = 1.02 gamma`` *every computed entry is a lower bound of its
t_j* (less an underflow term ``eta``, negligible unless entries are ~1e-38). The engines (which one runs,
its threads and GPUs: pipeline.geometry.kmeans_engines):

- CPU (the default without a GPU), in tiles of rows on all threads (numpy, one BLAS thread per worker): the
  float32 GEMM, per row its smallest entry ``j1`` and the smallest of the others (``argmin``, then ``min`` with
  ``j1`` masked: the lower bound of every other centroid); the rows it cannot certify, the same in float64.
- GPU (faiss-gpu sees a GPU): a faiss ``IndexFlatIP`` of the ``-y''_j`` in float32, replicated on every visible
  GPU (each searches a share of the rows), top ``candidates`` (at least 2), the last one's value the lower bound
  of every centroid outside them; the rows it cannot certify go to the CPU's float64 GEMM.
- GPU through torch (a CUDA GPU that faiss does not see): the float64 GEMM on the GPU in tiles of rows, its
  smallest two entries per row (``topk``) brought back; the rows it cannot certify (near-ties) go to the CPU's
  float64 path, which decides them over their near-ties.

**The certificate.** The candidates are re-ranked by the reference value itself; the best one's direct-difference
``t`` (relative error ``<= (d + 7) u``), times a margin that covers the reference value's own rounding (its
*ceiling*), must stay below the lower bound of every other centroid, so that their reference values are all
strictly larger. A row that fails in float64 is decided by the reference value over the centroids whose float64
lower bound is under its ceiling (its near-ties: exact duplicates, or gaps below ~1e-13 of ``a_j (r + s_j)^2``),
or over every centroid when those are more than a quarter of them. The result is therefore the reference rule's
assignment over all centroids, whatever the engine, block size or thread count, and the distance is the winner's
reference value computed as `assign_exact` computes it (bit-identical).

What the certificate assumes: IEEE float32 / float64 arithmetic in the GEMM (not TF32 or float16: do not set
NVIDIA_TF32_OVERRIDE=1 for faiss). Where float32 is weak: next to the boundary its error (``a_j ~ 1 / (2 gap)``)
exceeds the gaps between near centroids, so the share of rows redone in float64 grows with ``1 / gap`` (16 % at
d = 16 and 29 % at d = 256 in benchmarks/bench_kmeans.py, radii to ``1 - |x| = 1e-3``; logged, and returned in
``stats``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.geometry.kmeans_blocks import _BLOCK, blocks, check_points, read_block, rows_per_block
from pipeline.geometry.kmeans_engines import _Faiss, _one_blas_thread

log = logging.getLogger(__name__)

_U32 = 2.0**-24
_U64 = 2.0**-53
_TILE = 1 << 20  # elements of one worker's float64 GEMM tile (8 MB)
_TORCH_TILE = 1 << 25  # elements of one float64 GEMM tile on the torch device (256 MB)


# ------------------------------------------------------------------------------------------------- geometry


def _den_gap(x: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """``D(x) = (1 - r)(1 + r)`` and the gap ``1 - r`` with ``r = sqrt(c)|x|`` (as pipeline.geometry.hyperbolic)."""
    r = math.sqrt(c) * np.linalg.norm(x, axis=1)
    gap = np.maximum(1 - r, np.finfo(np.float64).eps / 2)
    return gap * (1 + r), gap


def _arg(diff2: np.ndarray, den_x: np.ndarray, den_m: np.ndarray, c: float) -> np.ndarray:
    """``sqrt(c)|x - m| / sqrt(D(x) D(m))``; the distance is ``2/sqrt(c) asinh(arg)`` (monotone in arg)."""
    return math.sqrt(c) * np.sqrt(diff2) / (np.sqrt(den_x) * np.sqrt(den_m))


def _sq_diff(xb: np.ndarray, cent: np.ndarray, cand: np.ndarray | None) -> np.ndarray:
    """``|x - m|^2`` by direct differences, float64: (b, kk) over the candidates ``cand`` (b, kk), or (b, K)."""
    diff = xb[:, None, :] - (cent[None] if cand is None else cent[cand])
    return np.einsum("ijk,ijk->ij", diff, diff)


class Side(NamedTuple):
    """The centroids' side of one assignment: the reference value's terms and the GEMM's bases."""

    cent: np.ndarray  # (K, d) float64
    data: tuple[np.ndarray, ...]  # the reference value's per-centroid terms (Poincaré: D(m))
    weight: np.ndarray  # (K,) a_j: t_j = a_j |x - y_j|^2
    centre: np.ndarray  # (d,) p, the centroids' mean
    base: np.ndarray  # (d + 3, K) float64: the columns y''_j with float64's beta (see the module doc)
    base32: np.ndarray  # (d + 3, K) float32: the same with float32's beta
    big: float  # max |base| (for the underflow term)


def _side(cent: np.ndarray, weight: np.ndarray, data: tuple[np.ndarray, ...]) -> Side:
    k, d = cent.shape
    p = cent.mean(axis=0)
    yc = cent - p
    s2 = np.einsum("ij,ij->i", yc, yc)

    def columns(beta: float) -> np.ndarray:
        base = np.empty((d + 3, k))
        base[:d] = yc.T * (-2 * weight)
        base[d] = weight * (1 - beta)
        base[d + 1] = weight * s2 * (1 - beta)
        base[d + 2] = (-2 * beta) * weight * np.sqrt(s2)
        return base

    base = columns(_beta(d, _U64))
    return Side(cent, data, weight, p, base, columns(_beta(d, _U32)).astype(np.float32), float(abs(base).max()))


class Poincare:
    """The Poincaré ball of curvature -c: the reference value, the weights a_j and k-means++ seeding's terms."""

    def __init__(self, c: float) -> None:
        self.c = float(c)

    def seed_den(self, xs: np.ndarray) -> np.ndarray:
        return _den_gap(xs, self.c)[0]

    def rows(self, xb: np.ndarray) -> tuple[np.ndarray, ...]:
        return (_den_gap(xb, self.c)[0],)  # D(x)

    def side(self, cent: np.ndarray) -> Side:
        den_m = _den_gap(cent, self.c)[0]
        return _side(cent, 1 / den_m, (den_m,))

    def value(self, diff2: np.ndarray, rows: tuple, side: Side, cand: np.ndarray | None) -> np.ndarray:
        den_m = side.data[0][None] if cand is None else side.data[0][cand]
        return _arg(diff2, rows[0][:, None], den_m, self.c)

    def distance(self, value: np.ndarray) -> np.ndarray:
        return (2 / math.sqrt(self.c)) * np.arcsinh(value)


class Euclidean:
    """Euclidean space: the reference value (squared distance), unit weights and k-means++ seeding's terms."""

    c = None

    def seed_den(self, xs: np.ndarray) -> None:
        return None

    def rows(self, xb: np.ndarray) -> tuple[np.ndarray, ...]:
        return ()

    def side(self, cent: np.ndarray) -> Side:
        return _side(cent, np.ones(len(cent)), ())

    def value(self, diff2: np.ndarray, rows: tuple, side: Side, cand: np.ndarray | None) -> np.ndarray:
        return diff2

    def distance(self, value: np.ndarray) -> np.ndarray:
        return np.sqrt(value)


Geometry = Poincare | Euclidean


def _gamma(n: int, unit: float) -> float:
    """Relative error factor of one computed product ``x'' . y''_j`` of ``n`` terms in arithmetic of unit roundoff
    ``unit``, against ``sum_k |x''_k y''_k|``: the GEMM's ``n + 2``, ``2 n + 10`` float64 units for computing the
    entries, and one more rounding of each when they are cast to float32."""
    cast = 2 * unit if unit > _U64 else 0.0
    return 1.01 * ((n + 2) * unit + (2 * n + 10) * _U64 + cast)


def _beta(d: int, unit: float) -> float:
    """The share of ``a_j (r + s_j)^2`` subtracted from every entry, so that a computed entry is at most ``t_j``."""
    return 1.02 * _gamma(d + 3, unit)


def _eta(unit: float, n: int, xa: np.ndarray, big: float) -> float:
    """Absolute error from underflow (gradual or not) in a product of ``n`` terms of the precision of ``unit``."""
    tiny = float(np.finfo(np.float32 if unit > _U64 else np.float64).tiny)
    return (n + 2) * tiny * (1 + float(np.abs(xa).max(initial=0.0))) * (1 + big)


def _augment(xb: np.ndarray, side: Side) -> np.ndarray:
    """``x'' = (x - p, |x - p|^2, 1, |x - p|)`` (b, d + 3) float64."""
    b, d = xb.shape
    xa = np.empty((b, d + 3))
    np.subtract(xb, side.centre, out=xa[:, :d])
    r2 = np.einsum("ij,ij->i", xa[:, :d], xa[:, :d])
    xa[:, d] = r2
    xa[:, d + 1] = 1.0
    xa[:, d + 2] = np.sqrt(r2)
    return xa


def _exact(geom: Geometry, xb: np.ndarray, rows: tuple, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """Blocked brute force of the reference value over every centroid: ``(assignment, value)``; ties to the
    lowest index."""
    cent = side.cent
    k, d = cent.shape
    assignment = np.empty(len(xb), dtype=np.int32)
    value = np.empty(len(xb))
    step = max(1, _BLOCK // (k * d))
    for i in range(0, len(xb), step):
        s = slice(i, i + step)
        v = geom.value(_sq_diff(xb[s], cent, None), tuple(a[s] for a in rows), side, None)
        j = v.argmin(axis=1)
        assignment[s] = j
        value[s] = v[np.arange(len(j)), j]
    return assignment, value


class _Checked(NamedTuple):
    assignment: np.ndarray  # (b,) int32: the best candidate by the reference value
    value: np.ndarray  # (b,) its reference value
    certified: np.ndarray  # (b,) bool: no other centroid can have a reference value as small
    ceiling: np.ndarray  # (b,) a centroid whose t is above this cannot be as small either


def _rerank(
    geom: Geometry, xb: np.ndarray, rows: tuple, side: Side, cand: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best of the candidates ``cand`` (b, m), sorted ascending per row (repeats allowed), by the reference
    value (ties to the lowest index): ``(assignment int32, value, |x - m|^2 of it)``."""
    diff2 = _sq_diff(xb, side.cent, cand)
    value = geom.value(diff2, rows, side, cand)
    jj = value.argmin(axis=1)
    r = np.arange(len(jj))
    return cand[r, jj].astype(np.int32), value[r, jj], diff2[r, jj]


def _certify(geom: Geometry, xb: np.ndarray, rows: tuple, side: Side, cand: np.ndarray, lower: np.ndarray) -> _Checked:
    """Re-rank the candidates ``cand`` (b, m), sorted ascending per row, by the reference value and certify the
    best against every other centroid, whose exact ``t`` is at least ``lower`` (b,)."""
    d = xb.shape[1]
    a, value, diff2 = _rerank(geom, xb, rows, side, cand)
    eps = 4 * (d + 16) * _U64  # t's error (direct differences) and the reference value's rounding, both sides
    ceiling = diff2 * side.weight[a] * ((1 + eps) / (1 - eps))
    return _Checked(a, value, ceiling < lower, ceiling)


def _top2(xa: np.ndarray, base: np.ndarray, buffer: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GEMM ``xa @ base`` (into ``buffer`` when given: no page faults per tile), its smallest entry per row and
    the smallest of the others: ``(j1, second as float64, tile with j1's entries set to inf)``."""
    tile = np.matmul(xa, base, out=None if buffer is None else buffer[: len(xa)])
    j1 = tile.argmin(axis=1)
    tile[np.arange(len(j1)), j1] = np.inf
    return j1, tile.min(axis=1).astype(np.float64), tile


def _gemm(
    geom: Geometry,
    xb: np.ndarray,
    rows: tuple,
    side: Side,
    buffers: dict[str, np.ndarray],
    float32: bool = True,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One tile of rows on the CPU: the float32 GEMM's lower bounds and certificate (``float32``), the float64
    GEMM's for the rows it leaves open, and for the rows still open the reference value over the centroids whose
    lower bound is under the row's ceiling (the near-ties; every centroid when those are more than a quarter).
    ``buffers``: a worker's reusable tiles by dtype. Returns ``(assignment, value, rows redone in float64, rows
    decided over their near-ties)``."""
    k, n = len(side.cent), xb.shape[1] + 3
    xa = _augment(xb, side)
    todo = np.arange(len(xb))
    if float32:
        xa32 = xa.astype(np.float32)
        j1, lower, _ = _top2(xa32, side.base32, buffers.get("float32"))
        lower -= _eta(_U32, n, xa, side.big)
        checked = _certify(geom, xb, rows, side, j1[:, None], lower)
        a, v = checked.assignment, checked.value
        todo = np.flatnonzero(~checked.certified)
        if not todo.size:
            return a, v, 0, 0
    else:
        a, v = np.empty(len(xb), dtype=np.int32), np.empty(len(xb))
    xt, rt = xb[todo], tuple(q[todo] for q in rows)
    j1, lower, tile = _top2(xa[todo], side.base, buffers.get("float64"))
    checked = _certify(geom, xt, rt, side, j1[:, None], lower - _eta(_U64, n, xa, side.big))
    a[todo], v[todo] = checked.assignment, checked.value
    open_ = np.flatnonzero(~checked.certified)
    redone = int(todo.size) if float32 else 0
    if not open_.size:
        return a, v, redone, 0
    inside = tile[open_] <= checked.ceiling[open_, None]
    inside[np.arange(open_.size), j1[open_]] = True
    counts = inside.sum(axis=1)
    xo, ro = xt[open_], tuple(q[open_] for q in rt)
    if counts.max() > max(4, k // 4):
        a[todo[open_]], v[todo[open_]] = _exact(geom, xo, ro, side)
        return a, v, redone, int(open_.size)
    row, col = np.nonzero(inside)  # row by row, ascending centroid index
    starts = np.cumsum(counts) - counts
    cand = np.repeat(col[starts][:, None], counts.max(), axis=1)  # padded with each row's first candidate
    cand[row, np.arange(len(col)) - starts[row]] = col
    a[todo[open_]], v[todo[open_]], _ = _rerank(geom, xo, ro, side, cand)
    return a, v, redone, int(open_.size)


# ------------------------------------------------------------------------------------------------- assignment


class _Assigner:
    """Nearest centroid of every row of ``x``, block by block (nothing per point is kept between calls).

    ``geometry``: a `Poincare` / `Euclidean`, or a curvature c (the Poincaré ball). After a call: ``redone`` the
    rows the first search (CPU float32 GEMM, faiss, or torch's float64 GEMM) left to the CPU's float64 GEMM,
    ``fallback`` the rows decided by the reference value over their near-ties (or every centroid).
    """

    def __init__(
        self, x: Any, geometry: Geometry | float, engine: _Faiss, candidates: int, *, block_rows: int | None = None
    ) -> None:
        self.geom = geometry if isinstance(geometry, Poincare | Euclidean) else Poincare(float(geometry))
        self.x, self.engine, self.candidates = x, engine, candidates
        self.rows = rows_per_block(x, block_rows)
        self.fallback = self.redone = 0

    def _cpu(self, pool: ThreadPoolExecutor | None, xb: np.ndarray, rows: tuple, side: Side, float32: bool) -> tuple:
        """`_gemm` over the rows of ``xb`` in tiles (on the pool's workers when given), from float32 or float64."""
        k = len(side.cent)
        step = max(16, _TILE // k)
        tiles = [slice(i, min(len(xb), i + step)) for i in range(0, len(xb), step)]
        local = threading.local()  # one pair of tile buffers per worker thread

        def run(s: slice) -> tuple:
            if getattr(local, "buffers", None) is None:
                b = min(step, len(xb))
                local.buffers = {"float32": np.empty((b, k), dtype=np.float32), "float64": np.empty((b, k))}
            return _gemm(self.geom, xb[s], tuple(q[s] for q in rows), side, local.buffers, float32)

        done = list(pool.map(run, tiles)) if pool is not None and len(tiles) > 1 else [run(s) for s in tiles]
        if not done:
            return np.empty(0, dtype=np.int32), np.empty(0), 0, 0
        return (
            np.concatenate([t[0] for t in done]),
            np.concatenate([t[1] for t in done]),
            sum(t[2] for t in done),
            sum(t[3] for t in done),
        )

    def _certified(self, pool, xb: np.ndarray, rows: tuple, side: Side, cand: np.ndarray, lower: np.ndarray) -> tuple:
        """A GPU search's answer (candidates ``cand``, lower bound ``lower`` of every other centroid) certified;
        the rows it cannot certify decided by the CPU's float64 path. ``(assignment, value, rows redone, rows
        decided over their near-ties)``."""
        checked = _certify(self.geom, xb, rows, side, cand, lower)
        a, v = checked.assignment, checked.value
        todo = np.flatnonzero(~checked.certified)
        fallback = 0
        if todo.size:
            a[todo], v[todo], _, fallback = self._cpu(pool, xb[todo], tuple(q[todo] for q in rows), side, False)
        return a, v, int(todo.size), fallback

    def _faiss(self, index: Any, kk: int, xb: np.ndarray, rows: tuple, side: Side, pool) -> tuple:
        """faiss float32 on the rows of ``xb``; the rows it cannot certify go to the CPU's float64 GEMM."""
        xa = _augment(xb, side)
        dist, cand = index.search(xa.astype(np.float32), kk)  # inner products with -y'': largest first
        lower = -dist[:, kk - 1].astype(np.float64) - _eta(_U32, xa.shape[1], xa, side.big)
        cand = np.sort(cand, axis=1)  # ties go to the lowest index, as in the brute force
        return self._certified(pool, xb, rows, side, cand, lower)

    def _torch(self, base: Any, xb: np.ndarray, rows: tuple, side: Side, pool) -> tuple:
        """The float64 GEMM ``x'' . y''_j`` on the torch device (``base``: the columns there), its two smallest
        entries per row; the rows it cannot certify are decided by the CPU's float64 path."""
        xa = _augment(xb, side)
        k = len(side.cent)
        step = max(1, _TORCH_TILE // k)
        j1, second = np.empty(len(xa), dtype=np.int64), np.empty(len(xa))
        for i in range(0, len(xa), step):
            tile = torch.from_numpy(xa[i : i + step]).to(base.device, non_blocking=True) @ base
            values, index = tile.topk(2, dim=1, largest=False)  # an exact tie of the two fails the certificate
            j1[i : i + step], second[i : i + step] = index[:, 0].cpu().numpy(), values[:, 1].cpu().numpy()
        lower = second - _eta(_U64, xa.shape[1], xa, side.big)
        return self._certified(pool, xb, rows, side, j1[:, None], lower)

    def __call__(
        self, cent: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(assignment int32 (N,), distance float64 (N,))`` to the centroids ``cent``, written into ``out``
        when given."""
        geom, x, engine = self.geom, self.x, self.engine
        k = len(cent)
        n = x.shape[0]
        assignment, distance = out if out is not None else (np.empty(n, dtype=np.int32), np.empty(n))
        side = geom.side(np.ascontiguousarray(cent, dtype=np.float64))
        kk = min(max(self.candidates, 2), k)  # one candidate would leave the certificate nothing to compare with
        index = engine.index(np.ascontiguousarray(-side.base32.T)) if engine.faiss and kk < k else None
        base = None
        if engine.torch_device is not None and k > 1:
            base = torch.from_numpy(side.base).to(engine.torch_device)
        fallback = redone = 0
        workers = engine.threads
        pool_context = ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext()
        with _one_blas_thread(), pool_context as pool:
            for s in blocks(n, self.rows):
                xb = read_block(x, s)
                rows = geom.rows(xb)
                if k == 1:
                    a, v = _exact(geom, xb, rows, side)
                    r = f = 0
                elif index is not None:
                    a, v, r, f = self._faiss(index, kk, xb, rows, side, pool)
                elif base is not None:
                    a, v, r, f = self._torch(base, xb, rows, side, pool)
                else:
                    a, v, r, f = self._cpu(pool, xb, rows, side, True)
                redone += r
                fallback += f
                assignment[s] = a
                distance[s] = geom.distance(v)
        self.fallback, self.redone = fallback, redone
        if fallback or redone:
            log.debug("%d of %d points redone in float64, %d decided over their near-ties", redone, n, fallback)
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
    engine: _Faiss | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point (the search, the certificate and the fallbacks of the module doc):
    ``(assignment int32 (N,), distance float64 (N,))``, equal to `assign_exact`. ``geometry`` "poincare"
    (curvature -c) or "euclidean" (``c`` unused); ``x`` as in the module doc; ``candidates``: the faiss top-k.

    ``stats``, when given, receives ``{"redone": rows the float32 certificate sent to float64, "fallback": rows
    float64 left to their near-ties, "search": the engine's name, "gpu": whether it ran on a GPU}``.
    """
    geom = _geometry(geometry, c)
    x = check_points(x, geom.c, block_rows)
    centroids = np.ascontiguousarray(check_points(centroids, geom.c), dtype=np.float64)
    if x.shape[1] != centroids.shape[1]:
        raise PipelineError(f"points have dimension {x.shape[1]} but centroids {centroids.shape[1]}")
    if len(centroids) == 0:
        raise PipelineError("no centroids")
    engine = engine if engine is not None else _Faiss(use_gpu)
    assigner = _Assigner(x, geom, engine, candidates, block_rows=block_rows)
    out = assigner(centroids)
    if stats is not None:
        on_gpu = engine.gpu or (engine.torch_device is not None and engine.torch_device.type == "cuda")
        stats.update(fallback=assigner.fallback, redone=assigner.redone, search=engine.name, gpu=on_gpu)
    return out


def assign_exact(
    x: Any, centroids: Any, c: float = 1.0, *, geometry: str = "poincare", block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by brute force in float64 (direct differences, blocked): ``(assignment int32 (N,),
    distance float64 (N,))``. The reference rule of the module doc; ``O(N K d)``. Ties: lowest index."""
    geom = _geometry(geometry, c)
    x = check_points(x, geom.c, block_rows)
    centroids = np.ascontiguousarray(check_points(centroids, geom.c), dtype=np.float64)
    side = geom.side(centroids)
    assignment, distance = np.empty(x.shape[0], dtype=np.int32), np.empty(x.shape[0])
    for s in blocks(x.shape[0], rows_per_block(x, block_rows)):
        xb = read_block(x, s)
        assignment[s], v = _exact(geom, xb, geom.rows(xb), side)
        distance[s] = geom.distance(v)
    return assignment, distance
