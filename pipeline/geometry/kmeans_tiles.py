"""One tile of rows of the nearest-centroid assignment's CPU search (pipeline.geometry.kmeans_assign): the GEMM's
lower bounds (numpy's, or kmeans_fused's kernel), the certificate, the near-ties and the fallbacks.

kmeans_assign's module doc describes the rule, the search and the certificate; `_gemm` runs them on one tile of
rows and returns the rows it leaves open as their near-ties' (row, centroid) pairs, which `_near_ties` decides by
the reference value. `_exact` is the brute force over every centroid, `_certify` the certificate of a search's
candidates (also the GPU searches').
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.geometry import kmeans_fused
from pipeline.geometry.kmeans_blocks import _BLOCK
from pipeline.geometry.kmeans_terms import (
    _U32,
    _U64,
    Geometry,
    Side,
    _augment,
    _ceiling_margin,
    _eta,
    _fits,
    _sq_diff,
)

_TILE = 1 << 20  # elements of one worker's float64 GEMM tile (8 MB)
_PAIRS = 1 << 18  # elements of a near-tie difference temporary (2 MB)
_WIDE = 64  # near-ties a row may leave to `_near_ties` (more: float64 first, then every centroid)


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
    eta = _eta(unit, xa.shape[1], xa, side.big)
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
