"""One tile of the CPU search (kmeans_tiles): the certificate against adversarial rounding of the GEMM, rows with
more near-ties than a precision can separate (float64 first, then every centroid), and the rows the fused kernel
leaves open, whose entries are computed again in bounded pieces; each against the float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.geometry import kmeans_assign as ka
from pipeline.geometry import kmeans_engines as ke
from pipeline.geometry import kmeans_fused
from pipeline.geometry import kmeans_terms as kt
from pipeline.geometry import kmeans_tiles as ktiles
from pipeline.geometry.kmeans import assign, assign_exact
from tests.geometry.test_kmeans import mixed_points, unit_rows
from tests.geometry.test_kmeans_assign import near_ties


@pytest.mark.parametrize("float32", [False, True])
@pytest.mark.parametrize("geometry", ["poincare", "euclidean"])
def test_certificate_survives_adversarial_rounding(monkeypatch, geometry, float32):
    """Every GEMM entry (float64, or float32) moved by 0.8 of the rounding bound ``gamma a_j (r + s_j)^2`` (up and
    down alternately), which the shift ``beta a_j (r^2 + s_j^2)`` covers with the GEMM's own rounding to spare
    (``beta = 2.04 gamma``; with half that beta, enough only where ``r`` and ``s_j`` differ, this fails): the rows
    the certificate leaves open are decided over the centroids under their ceiling, and every row must still get
    the brute force's centroid (a centroid wrongly left out of a row's near-ties would show)."""
    rng = np.random.default_rng(5 if float32 else 3)
    x = mixed_points(rng, 3000, 8, 1.0)
    moved = 1e-6 if float32 else 1e-10  # near-ties just beyond each precision's bound
    cent = np.concatenate([x[:40], near_ties(rng, x[:40], 40, moved, 1.0), mixed_points(rng, 40, 8, 1.0)])
    geom = kt._geometry(geometry, 1.0)
    side = geom.side(cent)
    gamma = kt._gamma(8 + 2, kt._U32 if float32 else kt._U64)
    s = np.linalg.norm(cent - side.centre, axis=1)
    target = side.base32 if float32 else side.base
    real = np.matmul

    def worst(a, b, out=None):
        t = real(a, b, out=out)
        if b is target:
            r = np.sqrt(a[:, -2:-1].astype(np.float64))  # x'' = (x - p, r^2, 1)
            err = 0.8 * gamma * side.weight[None] * (r + s[None]) ** 2
            t += np.where((np.arange(t.shape[1]) + np.arange(t.shape[0])[:, None]) % 2 == 0, err, -err)
        return t

    monkeypatch.setattr(ktiles.np, "matmul", worst)
    assigner = ka._Assigner(x, geom, ke._Faiss(False), 4)
    a, v, redone, fallback = assigner._cpu(None, x, geom.rows(x), side, float32)
    monkeypatch.undo()
    ex_a, ex_d = assign_exact(x, cent, geometry=geometry)
    np.testing.assert_array_equal(a, ex_a)
    np.testing.assert_array_equal(geom.distance(v), ex_d)
    assert redone == 0 and 0 < fallback < len(x) // 2


def test_rows_with_many_float32_near_ties_go_through_float64(monkeypatch):
    """100 centroids within a relative 1e-7 of one point next to the boundary: float32 cannot tell them apart, so
    each row near them has ~100 near-ties; such rows go through the float64 GEMM first (``redone``), and the result
    is the brute force's whether they do or not. (numpy's GEMM: through the fused kernel every row float32 leaves
    open goes to float64, whatever its near-ties.)"""
    rng = np.random.default_rng(6)
    centre = unit_rows(rng, 1, 16) * (1 - 1e-4)
    cent = np.concatenate([near_ties(rng, centre, 100, 1e-7, 1.0), mixed_points(rng, 30, 16, 1.0)])
    x = np.concatenate([near_ties(rng, centre, 300, 1e-6, 1.0), mixed_points(rng, 700, 16, 1.0)])
    ex_a, ex_d = assign_exact(x, cent)
    for wide, float64_rows in ((ktiles._WIDE, True), (len(cent), False)):
        monkeypatch.setattr(ktiles, "_WIDE", wide)
        stats: dict = {}
        a, dist = assign(x, cent, stats=stats, engine=ke._Faiss(False, fused=False))
        np.testing.assert_array_equal(a, ex_a)
        np.testing.assert_array_equal(dist, ex_d)
        assert (stats["redone"] >= 100) == float64_rows and stats["fallback"] > 0


def test_rows_with_many_float64_near_ties_are_decided_over_every_centroid(monkeypatch):
    """100 exact duplicates of one centroid: float64 cannot rule any of them out either, so rows next to them
    (more than ``_WIDE`` near-ties in both precisions) are decided by the brute force over every centroid, and get
    the lowest index of the duplicates."""
    rng = np.random.default_rng(9)
    centre = unit_rows(rng, 1, 16) * 0.9
    cent = np.concatenate([mixed_points(rng, 20, 16, 1.0), np.repeat(centre, 100, axis=0)])
    x = np.concatenate([near_ties(rng, centre, 200, 1e-3, 1.0), mixed_points(rng, 800, 16, 1.0)])
    brute = []
    real = ktiles._exact

    def counted(geom, xb, rows, side):
        brute.append(len(xb))
        return real(geom, xb, rows, side)

    monkeypatch.setattr(ktiles, "_exact", counted)
    stats: dict = {}
    a, dist = assign(x, cent, use_gpu=False, stats=stats)
    monkeypatch.undo()
    ex_a, ex_d = assign_exact(x, cent)
    np.testing.assert_array_equal(a, ex_a)
    np.testing.assert_array_equal(dist, ex_d)
    assert (a[:200] == 20).all()  # the first of the duplicates
    assert sum(brute) >= 200 and stats["redone"] >= 200 and stats["fallback"] >= 200


@pytest.mark.skipif(not kmeans_fused.width(), reason="the fused kernel is not built")
def test_the_open_rows_tile_is_computed_again_in_bounded_pieces(monkeypatch):
    """Through the fused kernel, the rows float64 leaves open get their entries computed again for their
    near-ties, at most ``_TILE`` elements at a time: the same result with pieces of 16 rows."""
    rng = np.random.default_rng(9)
    centre = unit_rows(rng, 1, 16) * 0.9
    cent = np.concatenate([mixed_points(rng, 20, 16, 1.0), np.repeat(centre, 5, axis=0)])  # exact duplicates
    x = np.concatenate([near_ties(rng, centre, 200, 1e-3, 1.0), mixed_points(rng, 300, 16, 1.0)])
    pieces = []
    real = ktiles._near_tie_pairs

    def counted(tile, j1, threshold):
        pieces.append(len(tile))
        return real(tile, j1, threshold)

    monkeypatch.setattr(ktiles, "_near_tie_pairs", counted)
    monkeypatch.setattr(ktiles, "_TILE", 16 * len(cent))
    a, dist = assign(x, cent, engine=ke._Faiss(False))
    monkeypatch.undo()
    ex_a, ex_d = assign_exact(x, cent)
    np.testing.assert_array_equal(a, ex_a)
    np.testing.assert_array_equal(dist, ex_d)
    assert len(pieces) > 10 and max(pieces) == 16
