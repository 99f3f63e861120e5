"""Nearest-centroid assignment of k-means (pipeline.geometry.kmeans), streamed by blocks of rows, in both geometries.

Points ``x`` are read by blocks of rows as kmeans_blocks describes (a numpy or a zarr array, never read
whole; the CPU search holds two blocks at a time, the next one's tiles queued before the last one is collected);
the search engine (CPU threads, faiss on GPUs) is chosen by kmeans_engines. The result does not depend on the
block size, nor on the number of threads or GPUs.

**The rule.** Every point goes to the centroid of smallest float64 *reference value*, ties to the lowest index:
Poincaré ball of curvature -c: ``sqrt(c)|x - m| / sqrt(D(x) D(m))`` with ``D = (1 - sqrt(c)|.|)(1 + sqrt(c)|.|)``
(the distance is ``2/sqrt(c) asinh`` of it, the same ranking as the closed form ``arcosh(1 + 2c|x-m|^2 / (D(x)
D(m)))``); Euclidean: ``sum (x_i - m_i)^2`` (the distance is its square root); both from direct differences.
`assign_exact` evaluates it over every centroid (``O(N K d)``, the reference).

**The search.** For a fixed point both rankings are that of ``t_j = a_j |x - y_j|^2`` (``a_j = 1 / D(y_j)``; 1 in
Euclidean space). With ``p`` the centroids' mean, ``r = |x - p|``, ``s_j = |y_j - p|``,
``x'' = (x - p, r^2, 1)`` and ``y''_j = (-2 a_j (y_j - p), a_j (1 - beta), a_j s_j^2 (1 - beta))``, one matrix
product gives ``x'' . y''_j = t_j - beta a_j (r^2 + s_j^2)``. Computed in a precision of unit roundoff ``u``, an
entry is off by at most ``gamma a_j (r + s_j)^2 <= 2 gamma a_j (r^2 + s_j^2)`` (``gamma``: the GEMM's ``(n + 2)
u`` for ``n = d + 2`` terms, in any summation order, plus the rounding of ``x''`` and ``y''``; ``sum_k |x''_k
y''_k| <= a_j (r + s_j)^2`` by Cauchy-Schwarz), so with ``beta = 2.04 gamma`` *every computed entry is a lower
bound of its t_j* (less an underflow term ``eta``, negligible unless entries are ~1e-38). For a row's near
centroids (``s_j`` close to ``r``) the shift is what the tighter ``beta a_j (r + s_j)^2`` with half that beta
would be, without a term ``r`` more in every product. The engines (which one runs,
its threads and GPUs: pipeline.geometry.kmeans_engines):

- CPU (the default without a GPU), in tiles of rows on all threads (numpy, one BLAS thread per worker; as many
  tiles a worker, and the next block's tiles queued before a block is collected, so that no worker waits): the
  float32 GEMM, per row its smallest entry ``j1`` and the smallest of the others (``argmin``, then ``min`` with
  ``j1`` masked: the lower bound of every other centroid); the rows it cannot certify are decided over their
  near-ties (below), except rows with more than ``kmeans_tiles._WIDE`` of them (float32's bound too loose: next to the
  boundary), which take the same GEMM in float64 first. Up to d = 64, where the kernel is built (kmeans_fused),
  each GEMM and its top-2 are one fused pass that writes no tile, and every row float32 leaves open takes the
  float64 pass (cheaper than its near-ties); the rows float64 leaves open have their entries computed again.
  One tile's search, certificate and fallbacks: pipeline.geometry.kmeans_tiles.
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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.geometry import kmeans_fused, kmeans_tiles, kmeans_torch
from pipeline.geometry.kmeans_blocks import _BLOCK, blocks, check_points, read_block, rows_per_block
from pipeline.geometry.kmeans_engines import _Faiss, _one_blas_thread
from pipeline.geometry.kmeans_terms import (
    _U32,
    Euclidean,
    Geometry,
    Poincare,
    Side,
    _augment,
    _eta,
    _fits,
    _geometry,
    _sq_diff,
)
from pipeline.geometry.kmeans_tiles import _certify, _exact, _fitting, _gemm, _near_ties

log = logging.getLogger(__name__)

_ROWS = 4096  # rows of a worker's share of the per-row terms, at least
_FUSED_ROWS = 4096  # rows of a worker's tile through the fused kernel (no tile written: fewer, larger calls)


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
        k = side.cent.shape[0]
        step = max(16, kmeans_tiles._TILE // k) if fused is None else _FUSED_ROWS
        tiles = list(blocks(len(xb), _balanced(len(xb), step, self._workers(pool))))
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
        done = [t.result() if isinstance(t, Future) else t for t in started]
        if not done:
            return np.empty(0, dtype=np.int32), np.empty(0), 0, 0
        a, v = np.concatenate([t.assignment for t, _, _ in done]), np.concatenate([t.value for t, _, _ in done])
        row = np.concatenate([t.row + start for t, start, _ in done])
        col = np.concatenate([t.col for t, _, _ in done])
        redone, exact = sum(t.redone for t, _, _ in done), sum(t.exact for t, _, _ in done)
        if not row.size:
            return a, v, redone, exact
        rows = tuple(np.concatenate(terms) for terms in zip(*(rs for _, _, rs in done), strict=True))
        per = min(_BLOCK // side.cent.shape[1], -(-len(row) // self._workers(pool)))
        starts = np.searchsorted(row, row[:: max(1, per)])  # chunks of pairs that end between rows
        ends = np.r_[starts[1:], len(row)]
        chunks = [slice(lo, hi) for lo, hi in zip(starts, ends, strict=True) if hi > lo]
        decided = _map(pool, lambda c: _near_ties(self.geom, xb, rows, side, row[c], col[c]), chunks)
        for open_, best, value in decided:
            a[open_], v[open_] = best, value
        return a, v, redone, exact + sum(len(t[0]) for t in decided)

    def _workers(self, pool: ThreadPoolExecutor | None) -> int:
        """The threads that run a block's work: the engine's with a pool, else this one."""
        return self.engine.threads if pool is not None else 1

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
        the winners' reference values computed on the worker pool as `kmeans_tiles._rerank` computes them (the same
        bits as `assign_exact`), one share of the rows each. The rows it cannot certify are decided by the CPU's
        float64 path."""
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
