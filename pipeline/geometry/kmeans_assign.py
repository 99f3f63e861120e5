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

- CPU (the default without a GPU), in tiles of rows on all threads (numpy, one BLAS thread per worker; as many
  tiles a worker, and the next block's tiles queued before a block is collected, so that no worker waits): the
  float32 GEMM, per row its smallest entry ``j1`` and the smallest of the others (``argmin``, then ``min`` with
  ``j1`` masked: the lower bound of every other centroid); the rows it cannot certify are decided over their
  near-ties (below), except rows with more than ``_WIDE`` of them (float32's bound too loose: next to the
  boundary), which take the same GEMM in float64 first. Up to d = 64, where the kernel is built (kmeans_fused),
  each GEMM and its top-2 are one fused pass that writes no tile, and every row float32 leaves open takes the
  float64 pass (cheaper than its near-ties); the rows float64 leaves open have their entries computed again.
- GPU (faiss-gpu sees a GPU): a faiss ``IndexFlatIP`` of the ``-y''_j`` in float32, replicated on every visible
  GPU (each searches a share of the rows), top ``candidates`` (at least 2), the last one's value the lower bound
  of every centroid outside them; the rows it cannot certify go to the CPU's float64 GEMM.
- GPU through torch (a CUDA GPU that faiss does not see): ``x''``, the float64 GEMM in tiles of rows, per row its
  smallest entry and the smallest of the others, and the certificate, all on the GPU (pipeline.geometry.
  kmeans_torch), queued before the block's per-row terms are computed on the CPU and brought back once per block;
  the winners' reference values on the CPU's worker pool; the rows it cannot certify (near-ties) go to the CPU's
  float64 path, which decides them over their near-ties.

**The certificate.** The candidates are re-ranked by the reference value itself; the best one's direct-difference
``t`` (relative error ``<= (d + 7) u``), times a margin that covers the reference value's own rounding (its
*ceiling*), must stay below the lower bound of every other centroid, so that their reference values are all
strictly larger. A row that fails is decided by the reference value over the centroids whose lower bound is under
its ceiling (its *near-ties*: in float64 exact duplicates, or gaps below ~1e-13 of ``a_j (r + s_j)^2``; in float32
gaps below ~1e-6 of it), every other centroid being strictly worse. The result is therefore the reference rule's
assignment over all centroids, whatever the engine, block size or thread count, and the distance is the winner's
reference value computed as `assign_exact` computes it (bit-identical).

What the certificate assumes: IEEE float32 / float64 arithmetic in the GEMM (not TF32 or float16: do not set
NVIDIA_TF32_OVERRIDE=1 for faiss), and no overflow in it: a row whose entries could exceed the largest float
(`kmeans_terms._fits`: coordinates beyond ~1e15 for float32, ~1e150 for float64) goes one precision further, the
last step being direct differences; a faiss label it could not fill (-1) leaves its row uncertified. Where
float32 is weak: next to the boundary its error (``a_j ~ 1 / (2 gap)``) exceeds the gaps between near centroids,
so the share of rows it leaves open grows with ``1 / gap`` (16 % at d = 16 and 29 % at d = 256 in
benchmarks/bench_kmeans.py, radii to ``1 - |x| = 1e-3``, with 5 and 10 near-ties a row on average, 22 and 48 at
most; logged, and returned in ``stats``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from pipeline.errors import PipelineError
from pipeline.geometry import kmeans_fused, kmeans_torch
from pipeline.geometry.kmeans_blocks import _BLOCK, blocks, check_points, read_block, rows_per_block
from pipeline.geometry.kmeans_engines import _Faiss, _one_blas_thread
from pipeline.geometry.kmeans_terms import (
    _U32,
    _U64,
    Euclidean,
    Geometry,
    Poincare,
    Side,
    _augment,
    _ceiling_margin,
    _eta,
    _fits,
    _geometry,
    _sq_diff,
)

log = logging.getLogger(__name__)

_TILE = 1 << 20  # elements of one worker's float64 GEMM tile (8 MB)
_PAIRS = 1 << 18  # elements of a near-tie difference temporary (2 MB)
_ROWS = 4096  # rows of a worker's share of the per-row terms, at least
_WIDE = 64  # near-ties a row may leave to `_near_ties` (more: float64 first, then every centroid)
_FUSED_ROWS = 4096  # rows of a worker's tile through the fused kernel (no tile written: fewer, larger calls)


# --------------------------------------------------------------------------------------------------- search


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
    if cand.shape[1] == 1:  # one candidate (the CPU's searches): nothing to rank
        return cand[:, 0].astype(np.int32), value[:, 0], diff2[:, 0]
    jj = value.argmin(axis=1)
    r = np.arange(len(jj))
    return cand[r, jj].astype(np.int32), value[r, jj], diff2[r, jj]


def _certify(geom: Geometry, xb: np.ndarray, rows: tuple, side: Side, cand: np.ndarray, lower: np.ndarray) -> _Checked:
    """Re-rank the candidates ``cand`` (b, m), sorted ascending per row, by the reference value and certify the
    best against every other centroid, whose exact ``t`` is at least ``lower`` (b,)."""
    a, value, diff2 = _rerank(geom, xb, rows, side, cand)
    ceiling = diff2 * side.weight[a] * _ceiling_margin(xb.shape[1])
    return _Checked(a, value, ceiling < lower, ceiling)


def _top2(xa: np.ndarray, base: np.ndarray, buffer: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GEMM ``xa @ base`` (into ``buffer`` when given: no page faults per tile), its smallest entry per row and
    the smallest of the others: ``(j1, second as float64, tile with j1's entries set to inf)``."""
    tile = np.matmul(xa, base, out=None if buffer is None else buffer[: len(xa)])
    j1 = tile.argmin(axis=1)
    tile[np.arange(len(j1)), j1] = np.inf
    return j1, tile.min(axis=1).astype(np.float64), tile


def _near_tie_pairs(tile: np.ndarray, j1: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centroids each row's certificate could not rule out, its near-ties, as flat (row, centroid) pairs, row by
    row with ascending centroids: ``j1`` (b,) and those whose GEMM entry in ``tile`` (b, K; ``j1``'s own entries may
    be inf) is at most the row's ``threshold`` (b,: its ceiling plus the underflow term; rounded up to the tile's
    precision, so no centroid is lost)."""
    limit = threshold.astype(tile.dtype)
    limit = np.where(limit < threshold, np.nextafter(limit, tile.dtype.type(np.inf)), limit)
    inside = tile <= limit[:, None]
    inside[np.arange(len(j1)), j1] = True
    return np.divmod(np.flatnonzero(inside), inside.shape[1])


def _near_ties(
    geom: Geometry, xb: np.ndarray, rows: tuple, side: Side, row: np.ndarray, col: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best centroid of each row among its near-ties, given as flat (row, centroid) pairs sorted by row with
    ascending centroids (not padded to the largest count), by the reference value: ``(rows, assignment int32,
    value)``, ties to the lowest index."""
    diff2 = np.empty(len(row))
    step = max(16, _PAIRS // xb.shape[1])
    for i in range(0, len(row), step):  # 2 MB temporaries stay in a core's L2: 3.4x faster than 32 MB at d = 256
        diff = xb[row[i : i + step]]
        diff -= side.cent[col[i : i + step]]
        diff2[i : i + step] = np.einsum("ij,ij->i", diff, diff)
    value = geom.value(diff2[:, None], tuple(q[row] for q in rows), side, col[:, None])[:, 0]
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    best = np.minimum.reduceat(value, starts)
    hit = np.flatnonzero(value == np.repeat(best, np.diff(np.r_[starts, len(row)])))
    first = hit[np.r_[True, row[hit[1:]] != row[hit[:-1]]]]  # each row's first minimum: the lowest index
    return row[starts], col[first].astype(np.int32), value[first]


def _open_pairs(
    xa: np.ndarray, base: np.ndarray, j1: np.ndarray, threshold: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`_near_tie_pairs` of the rows ``xa`` without their tile: its entries computed again (``xa @ base``, numpy),
    ``_TILE`` elements at a time."""
    step = max(16, _TILE // base.shape[1])
    parts = [
        _near_tie_pairs(np.matmul(xa[i : i + step], base), j1[i : i + step], threshold[i : i + step])
        for i in range(0, len(xa), step)
    ]
    row = np.concatenate([r + i for (r, _), i in zip(parts, range(0, len(xa), step), strict=True)])
    return row, np.concatenate([c for _, c in parts])


class _Tile(NamedTuple):
    """What `_gemm` leaves of one tile of rows."""

    assignment: np.ndarray  # (b,) int32, provisional in the rows of ``row``
    value: np.ndarray  # (b,) the reference value of it
    redone: int  # rows redone in the float64 GEMM
    exact: int  # rows decided over every centroid
    row: np.ndarray  # the open rows' near-ties as (row, centroid) pairs, by row, ascending centroid
    col: np.ndarray


def _gemm(
    geom: Geometry,
    xb: np.ndarray,
    rows: tuple,
    side: Side,
    buffers: dict[str, np.ndarray],
    float32: bool = True,
    fused: tuple[np.ndarray, np.ndarray] | None = None,
) -> _Tile:
    """One tile of rows on the CPU: the GEMM's lower bounds and certificate, in float32 (``float32``) or float64.
    The rows it leaves open are returned as their near-ties' (row, centroid) pairs, to be decided by `_near_ties`,
    at most ``_WIDE`` a row: a row float32 leaves more (its bound too loose: next to the boundary) goes through the
    float64 GEMM first, and one float64 leaves more is decided over every centroid. ``buffers``: a worker's
    reusable tiles by dtype. ``fused``: the float32 and float64 bases padded for kmeans_fused's kernel, which then
    finds the top-2 without a tile; every row float32 leaves open then goes through the float64 kernel, and the
    rows float64 leaves open have their entries computed again, by numpy, for their near-ties."""
    unit, base = (_U32, side.base32) if float32 else (_U64, side.base)
    xa = _augment(xb, side)
    fits = _fits(xa, side, unit)
    if not fits.all():  # coordinates so large that the GEMM could overflow: those rows go one precision further
        return _split(geom, xb, rows, side, buffers, float32, fits, fused)
    xa = xa.astype(base.dtype, copy=False)
    if fused is not None:
        (j1, lower), tile = kmeans_fused.top2(xa, fused[0 if float32 else 1], base.shape[1]), None
    else:
        j1, lower, tile = _top2(xa, base, buffers.get(str(base.dtype)))
    eta = _eta(unit, xb.shape[1] + 3, xa, side.big)
    checked = _certify(geom, xb, rows, side, j1[:, None], lower - eta)
    a, v = checked.assignment, checked.value
    todo = np.flatnonzero(~checked.certified)
    none = np.empty(0, dtype=np.int64)
    if not todo.size:
        return _Tile(a, v, 0, 0, none, none)
    if fused is not None and float32:  # float64's top-2 costs less than float32's near-ties (16 % of rows at d = 16)
        redo = _gemm(geom, xb[todo], tuple(q[todo] for q in rows), side, buffers, False, fused)
        a[todo], v[todo] = redo.assignment, redo.value
        return _Tile(a, v, int(todo.size), redo.exact, todo[redo.row], redo.col)
    threshold = (checked.ceiling[todo] + eta) * (1 + 4 * _U64)  # the sum's rounding, upwards
    if tile is not None:
        row, col = _near_tie_pairs(tile[todo], j1[todo], threshold)  # row: into todo
    else:  # the fused kernel wrote no tile: the open rows' entries again, in tiles of `_TILE` elements at most
        row, col = _open_pairs(xa[todo], base, j1[todo], threshold)
    wide = np.bincount(row, minlength=todo.size) > _WIDE
    if not wide.any():
        return _Tile(a, v, 0, 0, todo[row], col)
    w = todo[wide]
    xw, rw = xb[w], tuple(q[w] for q in rows)
    keep = ~wide[row]
    row, col = todo[row[keep]], col[keep]
    if not float32:
        a[w], v[w] = _exact(geom, xw, rw, side)
        return _Tile(a, v, 0, int(w.size), row, col)
    redo = _gemm(geom, xw, rw, side, buffers, False)
    a[w], v[w] = redo.assignment, redo.value
    row, col = np.concatenate([row, w[redo.row]]), np.concatenate([col, redo.col])
    order = np.argsort(row, kind="stable")  # a row's pairs come from one precision: its centroids stay ascending
    return _Tile(a, v, int(w.size), redo.exact, row[order], col[order])


def _fitting(xa: np.ndarray, fits: np.ndarray) -> np.ndarray:
    """The rows of ``xa`` that `_fits` keeps, without a copy in the usual case where that is all of them."""
    return xa if fits.all() else xa[fits]


def _split(
    geom: Geometry,
    xb: np.ndarray,
    rows: tuple,
    side: Side,
    buffers: dict,
    float32: bool,
    fits: np.ndarray,
    fused: tuple[np.ndarray, np.ndarray] | None = None,
) -> _Tile:
    """`_gemm` of a tile whose rows ``~fits`` could overflow its precision: the others as usual, those in float64
    (from float32) or by direct differences over every centroid (from float64); the tiles merged."""
    inside, outside = np.flatnonzero(fits), np.flatnonzero(~fits)
    parts = []
    if inside.size:
        parts.append((inside, _gemm(geom, xb[inside], tuple(q[inside] for q in rows), side, buffers, float32, fused)))
    xs, rs = xb[outside], tuple(q[outside] for q in rows)
    if float32:
        parts.append((outside, _gemm(geom, xs, rs, side, buffers, False, fused)))
    else:
        none = np.empty(0, dtype=np.int64)
        parts.append((outside, _Tile(*_exact(geom, xs, rs, side), 0, len(outside), none, none)))
    a, v = np.empty(len(xb), dtype=np.int32), np.empty(len(xb))
    for index, t in parts:
        a[index], v[index] = t.assignment, t.value
    row = np.concatenate([index[t.row] for index, t in parts])
    col = np.concatenate([t.col for _, t in parts])
    order = np.argsort(row, kind="stable")  # a row's pairs come from one part: its centroids stay ascending
    redone = sum(t.redone for _, t in parts) + (len(outside) if float32 else 0)
    return _Tile(a, v, redone, sum(t.exact for _, t in parts), row[order], col[order])


# ------------------------------------------------------------------------------------------------- assignment


def _balanced(n: int, rows: int, workers: int) -> int:
    """Rows per tile for ``n`` rows in tiles of at most ``rows``, their count a multiple of ``workers``: every
    worker gets as many tiles (a block of 13 tiles on 2 workers would leave one idle for the last)."""
    count = -(-n // rows)
    count = -(-count // workers) * workers
    return max(1, -(-n // count))


def _map(pool: ThreadPoolExecutor | None, fn, items: list) -> list:
    """``[fn(i) for i in items]``, on the pool's workers when there is a pool and more than one item."""
    return list(pool.map(fn, items)) if pool is not None and len(items) > 1 else [fn(i) for i in items]


class _Assigner:
    """Nearest centroid of every row of ``x``, block by block (nothing per point is kept between calls).

    ``geometry``: a `Poincare` / `Euclidean`, or a curvature c (the Poincaré ball). After a call: ``redone`` the
    rows the first search (CPU float32 GEMM, faiss, or torch's float64 GEMM) left to the CPU's float64 GEMM,
    ``fallback`` the rows decided by the reference value over their near-ties.
    """

    def __init__(
        self, x: Any, geometry: Geometry | float, engine: _Faiss, candidates: int, *, block_rows: int | None = None
    ) -> None:
        self.geom = geometry if isinstance(geometry, Poincare | Euclidean) else Poincare(float(geometry))
        self.x, self.engine, self.candidates = x, engine, candidates
        self.rows = rows_per_block(x, block_rows)
        self.fallback = self.redone = 0

    def _cpu(
        self,
        pool: ThreadPoolExecutor | None,
        xb: np.ndarray,
        rows: tuple | None,
        side: Side,
        float32: bool,
        fused: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple:
        """`_gemm` over the rows of ``xb`` in tiles (on the pool's workers when given), from float32 (through the
        fused kernel when ``fused``, its padded bases, are given) or float64, then the open rows of all tiles decided
        over their near-ties: `_collect` of `_start`. ``rows``: the geometry's per-row terms of ``xb``, or None
        (each tile computes its own).
        ``(assignment, value, rows redone in float64, rows decided over their near-ties)``."""
        return self._collect(pool, xb, side, self._start(pool, xb, rows, side, float32, fused))

    def _start(
        self,
        pool: ThreadPoolExecutor | None,
        xb: np.ndarray,
        rows: tuple | None,
        side: Side,
        float32: bool,
        fused: tuple[np.ndarray, np.ndarray] | None,
    ) -> list:
        """`_gemm` of every tile of ``xb``'s rows queued on the pool's workers (run here without a pool): one
        future (or result) a tile, of ``(tile, first row, the tile's per-row terms)``. The tiles are as many on
        every worker, so that none waits for the last."""
        k, d = side.cent.shape
        step = max(16, _TILE // k) if fused is None else _FUSED_ROWS
        tiles = list(blocks(len(xb), _balanced(len(xb), step, self.engine.threads if pool is not None else 1)))
        local = threading.local()  # one pair of tile buffers per worker thread

        def run(s: slice) -> tuple:
            if getattr(local, "buffers", None) is None:  # the fused kernel writes no tile
                b = min(step, len(xb))
                local.buffers = (
                    {} if fused is not None else {"float32": np.empty((b, k), np.float32), "float64": np.empty((b, k))}
                )
            rs = self.geom.rows(xb[s]) if rows is None else tuple(q[s] for q in rows)  # row by row: the same bits
            return _gemm(self.geom, xb[s], rs, side, local.buffers, float32, fused), s.start, rs

        return [pool.submit(run, s) for s in tiles] if pool is not None and len(tiles) > 1 else [run(s) for s in tiles]

    def _collect(self, pool: ThreadPoolExecutor | None, xb: np.ndarray, side: Side, started: list) -> tuple:
        """The tiles `_start` queued, merged, and their open rows decided over their near-ties (on the pool, in as
        many chunks as workers at least, of ``_BLOCK // d`` pairs at most, each row's pairs together):
        ``(assignment, value, rows redone in float64, rows decided over their near-ties)``."""
        done = [t if isinstance(t, tuple) else t.result() for t in started]
        if not done:
            return np.empty(0, dtype=np.int32), np.empty(0), 0, 0
        a, v = np.concatenate([t.assignment for t, _, _ in done]), np.concatenate([t.value for t, _, _ in done])
        row = np.concatenate([t.row + start for t, start, _ in done])
        col = np.concatenate([t.col for t, _, _ in done])
        redone, exact = sum(t.redone for t, _, _ in done), sum(t.exact for t, _, _ in done)
        if not row.size:
            return a, v, redone, exact
        rows = tuple(np.concatenate(terms) for terms in zip(*(rs for _, _, rs in done), strict=True))
        workers = self.engine.threads if pool is not None else 1
        per = min(_BLOCK // side.cent.shape[1], -(-len(row) // workers))
        starts = np.searchsorted(row, row[:: max(1, per)])  # chunks of pairs that end between rows
        ends = np.r_[starts[1:], len(row)]
        chunks = [slice(lo, hi) for lo, hi in zip(starts, ends, strict=True) if hi > lo]
        decided = _map(pool, lambda c: _near_ties(self.geom, xb, rows, side, row[c], col[c]), chunks)
        for open_, best, value in decided:
            a[open_], v[open_] = best, value
        return a, v, redone, exact + sum(len(t[0]) for t in decided)

    def _shares(self, n: int) -> list[slice]:
        """``n`` rows cut into one share per worker, of ``_ROWS`` rows at least."""
        return list(blocks(n, max(_ROWS, -(-n // self.engine.threads))))

    def _rows(self, pool: ThreadPoolExecutor | None, xb: np.ndarray) -> tuple:
        """The geometry's per-row terms of ``xb`` (Poincaré: D(x)), one share of the rows per worker (computed row
        by row: the same values as in one call), for the GPU searches (the CPU's tiles compute their own)."""
        shares = self._shares(len(xb))
        if pool is None or len(shares) <= 1:
            return self.geom.rows(xb)
        parts = _map(pool, lambda s: self.geom.rows(xb[s]), shares)
        return tuple(np.concatenate(terms) for terms in zip(*parts, strict=True))

    def _certified(self, pool, xb: np.ndarray, rows: tuple, side: Side, cand: np.ndarray, lower: np.ndarray) -> tuple:
        """A GPU search's answer (candidates ``cand``, lower bound ``lower`` of every other centroid) certified, and
        finished by `_finish`."""
        checked = _certify(self.geom, xb, rows, side, cand, lower)
        return self._finish(pool, xb, rows, side, checked.assignment, checked.value, checked.certified)

    def _finish(
        self, pool, xb: np.ndarray, rows: tuple, side: Side, a: np.ndarray, v: np.ndarray, certified: np.ndarray
    ) -> tuple:
        """The rows not ``certified`` decided by the CPU's float64 path, into the assignment ``a`` and reference
        values ``v``. ``(assignment, value, rows redone, rows decided over their near-ties)``."""
        todo = np.flatnonzero(~certified)
        fallback = 0
        if todo.size:
            a[todo], v[todo], _, fallback = self._cpu(pool, xb[todo], tuple(q[todo] for q in rows), side, False)
        return a, v, int(todo.size), fallback

    def _faiss(self, index: Any, kk: int, xb: np.ndarray, rows: tuple, side: Side, pool) -> tuple:
        """faiss float32 on the rows of ``xb``; the rows it cannot certify go to the CPU's float64 GEMM."""
        xa = _augment(xb, side)
        fits = _fits(xa, side, _U32)
        with np.errstate(over="ignore"):
            dist, cand = index.search(xa.astype(np.float32), kk)  # inner products with -y'': largest first
        lower = -dist[:, kk - 1].astype(np.float64) - _eta(_U32, xa.shape[1], _fitting(xa, fits), side.big)
        lower[~fits | (cand < 0).any(axis=1)] = -np.inf  # overflow, or a label faiss could not fill: uncertified
        cand = np.sort(np.maximum(cand, 0), axis=1)  # ties go to the lowest index, as in the brute force
        return self._certified(pool, xb, rows, side, cand, lower)

    def _torch(
        self,
        search: kmeans_torch.Search,
        device_side: kmeans_torch.DeviceSide,
        xb: np.ndarray,
        rows: tuple,
        side: Side,
        pool,
    ) -> tuple:
        """A block's torch search (`kmeans_torch.queue` on ``device_side``, certified on the device) brought back;
        the winners' reference values computed on the worker pool as `_rerank` computes them (the same bits as
        `assign_exact`), one share of the rows each. The rows it cannot certify are decided by the CPU's float64
        path."""
        j1, certified = kmeans_torch.collect(search, device_side)

        def value(s: slice) -> np.ndarray:
            cand = j1[s, None]
            return self.geom.value(_sq_diff(xb[s], side.cent, cand), tuple(q[s] for q in rows), side, cand)[:, 0]

        v = np.concatenate(_map(pool, value, self._shares(len(xb))))
        return self._finish(pool, xb, rows, side, j1, v, certified)

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
        device_side = fused = None
        if engine.torch_device is not None and k > 1 and index is None:
            device_side = kmeans_torch.device_side(side, engine.torch_device)
        elif engine.fused and index is None and side.base32.shape[0] <= kmeans_fused.MAX_TERMS:
            fused = kmeans_fused.pad(side.base32), kmeans_fused.pad(side.base)
        counts = [0, 0]  # rows redone in float64, rows decided over their near-ties

        def write(s: slice, a: np.ndarray, v: np.ndarray, redone: int, fallback: int) -> None:
            assignment[s], distance[s] = a, geom.distance(v)
            counts[0] += redone
            counts[1] += fallback

        cpu = k > 1 and index is None and device_side is None
        workers = engine.threads
        pool_context = ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext()
        with _one_blas_thread(), pool_context as pool:
            pending = None  # the CPU search's last block, its tiles queued
            for s in blocks(n, self.rows):
                xb = read_block(x, s)  # while the last block's tiles run
                if cpu:  # this block's tiles queued before the last one's are collected: no worker waits between
                    started = self._start(pool, xb, None, side, True, fused)
                    if pending is not None:
                        write(pending[0], *self._collect(pool, pending[1], side, pending[2]))
                    pending = s, xb, started
                    continue
                queued = None if device_side is None else kmeans_torch.queue(xb, device_side)
                rows = self._rows(pool, xb)  # while the device searches
                if k == 1:
                    write(s, *_exact(geom, xb, rows, side), 0, 0)
                elif index is not None:
                    write(s, *self._faiss(index, kk, xb, rows, side, pool))
                else:
                    write(s, *self._torch(queued, device_side, xb, rows, side, pool))
            if pending is not None:
                write(pending[0], *self._collect(pool, pending[1], side, pending[2]))
        redone, fallback = counts
        self.fallback, self.redone = fallback, redone
        if fallback or redone:
            log.debug("%d of %d points redone in float64, %d decided over their near-ties", redone, n, fallback)
        return assignment, distance


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

    ``stats``, when given, receives ``{"redone": rows redone in the CPU's float64 GEMM, "fallback": rows decided
    over their near-ties, "search": the engine's name, "gpu": whether it ran on a GPU}``.
    """
    geom = _geometry(geometry, c)
    engine = engine if engine is not None else _Faiss(use_gpu)
    x = check_points(x, geom.c, block_rows, engine.threads)
    centroids = np.ascontiguousarray(check_points(centroids, geom.c), dtype=np.float64)
    if x.shape[1] != centroids.shape[1]:
        raise PipelineError(f"points have dimension {x.shape[1]} but centroids {centroids.shape[1]}")
    if len(centroids) == 0:
        raise PipelineError("no centroids")
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
