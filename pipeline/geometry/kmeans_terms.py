"""The terms of the nearest-centroid assignment (pipeline.geometry.kmeans_assign): each geometry's reference value,
the GEMM's augmented rows and columns, and the rounding bounds that make every computed entry a lower bound.

The rule, the search and the certificate these serve are described in kmeans_assign's module doc; in short, both
geometries rank centroids by ``t_j = a_j |x - y_j|^2``, computed as ``x'' . y''_j`` by one matrix product whose
columns are shifted down by ``beta a_j (r^2 + s_j^2)``, so that an entry computed with unit roundoff ``u`` never
exceeds ``t_j`` (`_beta`, `_gamma`), less an underflow term (`_eta`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pipeline.errors import PipelineError

_U32 = 2.0**-24
_U64 = 2.0**-53


def ball_radius(x: np.ndarray, c: float) -> np.ndarray:
    """``r = sqrt(c)|x|`` per row, as `D(x)` computes it: the ball check (kmeans_blocks.check_points) decides the
    rows next to the boundary with it, so that every point it accepts has ``r < 1`` here too."""
    return math.sqrt(c) * np.linalg.norm(x, axis=1)


def _den(x: np.ndarray, c: float) -> np.ndarray:
    """``D(x) = (1 - r)(1 + r)`` with ``r = sqrt(c)|x|`` (`ball_radius`), the gap ``1 - r`` kept above eps / 2 (as
    pipeline.geometry.hyperbolic)."""
    r = ball_radius(x, c)
    return np.maximum(1 - r, np.finfo(np.float64).eps / 2) * (1 + r)


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
    base: np.ndarray  # (d + 2, K) float64: the columns y''_j with float64's beta (see the module doc)
    base32: np.ndarray  # (d + 2, K) float32: the same with float32's beta
    big: float  # max |base| (for the underflow term)
    weight_max: float  # max a_j (for the overflow bound, `_fits`)
    spread: float  # max s_j = |y_j - p| (the same)


def _side(cent: np.ndarray, weight: np.ndarray, data: tuple[np.ndarray, ...]) -> Side:
    k, d = cent.shape
    p = cent.mean(axis=0)
    yc = cent - p
    s2 = np.einsum("ij,ij->i", yc, yc)

    def columns(beta: float) -> np.ndarray:
        base = np.empty((d + 2, k))
        base[:d] = yc.T * (-2 * weight)
        base[d] = weight * (1 - beta)
        base[d + 1] = weight * s2 * (1 - beta)
        return base

    base = columns(_beta(d, _U64))
    with np.errstate(over="ignore"):  # centroids too far out for float32: `_fits` sends every row to float64
        base32 = columns(_beta(d, _U32)).astype(np.float32)
    s_max = float(np.sqrt(s2.max(initial=0.0)))
    return Side(cent, data, weight, p, base, base32, float(abs(base).max()), float(weight.max()), s_max)


class Poincare:
    """The Poincaré ball of curvature -c: the reference value, the weights a_j and k-means++ seeding's terms."""

    def __init__(self, c: float) -> None:
        self.c = float(c)

    def seed_den(self, xs: np.ndarray) -> np.ndarray:
        return _den(xs, self.c)

    def rows(self, xb: np.ndarray) -> tuple[np.ndarray, ...]:
        return (_den(xb, self.c),)  # D(x)

    def side(self, cent: np.ndarray) -> Side:
        den_m = _den(cent, self.c)
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
    """The share of ``a_j (r^2 + s_j^2)`` subtracted from every entry, so that a computed entry is at most ``t_j``:
    its error is at most ``gamma a_j (r + s_j)^2 <= 2 gamma a_j (r^2 + s_j^2)``. (The shift ``beta' a_j (r + s_j)^2``
    with half this beta is as tight where ``s_j = r``, as for a row's near centroids, but takes a term ``r`` more in
    every product: 19 multiply-adds instead of 18 at d = 16.)"""
    return 2.04 * _gamma(d + 2, unit)


def _eta(unit: float, n: int, xa: np.ndarray, big: float) -> float:
    """Absolute error from underflow (gradual or not) in a product of ``n`` terms of the precision of ``unit``."""
    tiny = float(np.finfo(np.float32 if unit > _U64 else np.float64).tiny)
    return (n + 2) * tiny * (1 + float(np.abs(xa).max(initial=0.0))) * (1 + big)


def _ceiling_margin(d: int) -> float:
    """The factor that rounds a direct-difference ``t = a |x - m|^2`` up past every error of its computation
    (relative error ``<= (d + 7) u``) and of the reference value's own rounding, both sides: a centroid whose
    lower bound is above ``t`` times this has a strictly larger reference value."""
    eps = 4 * (d + 16) * _U64
    return (1 + eps) / (1 - eps)


def _overflow_limit(unit: float) -> float:
    """The largest ``a_max (r + s_max)^2`` a GEMM of the precision of ``unit`` may see (`_fits`)."""
    return 2.0**100 if unit > _U64 else 2.0**1000


def _fits(xa: np.ndarray, side: Side, unit: float) -> np.ndarray:
    """Rows whose GEMM cannot overflow in the precision of ``unit``: every partial sum of ``x'' . y''_j`` is at most
    ``sum_k |x''_k y''_k| <= a_j (r + s_j)^2 <= a_max (r + s_max)^2`` in magnitude (the module doc's bound), which
    must stay far below the largest float (2^100 against float32's 2^128, 2^1000 against float64's 2^1024). Only
    coordinates beyond ~1e15 (float32) or ~1e150 (float64) fail it; such rows go to the next precision, the last
    to the direct differences of the reference value."""
    with np.errstate(over="ignore", invalid="ignore"):
        return side.weight_max * (np.sqrt(xa[:, -2]) + side.spread) ** 2 < _overflow_limit(unit)


def _augment(xb: np.ndarray, side: Side) -> np.ndarray:
    """``x'' = (x - p, |x - p|^2, 1)`` (b, d + 2) float64 (the constant last: kmeans_fused's kernel starts each
    sum from it)."""
    b, d = xb.shape
    xa = np.empty((b, d + 2))
    np.subtract(xb, side.centre, out=xa[:, :d])
    with np.errstate(over="ignore"):  # |x - p| beyond ~1e154: r^2 = inf, a row `_fits` rejects
        np.einsum("ij,ij->i", xa[:, :d], xa[:, :d], out=xa[:, d])
    xa[:, d + 1] = 1.0
    return xa


def _geometry(geometry: str, c: float) -> Geometry:
    if geometry == "poincare":
        return Poincare(c)
    if geometry == "euclidean":
        return Euclidean()
    raise PipelineError(f"geometry must be 'poincare' or 'euclidean', got {geometry!r}")
