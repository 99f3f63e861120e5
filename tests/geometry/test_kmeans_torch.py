"""The torch search on a device (pipeline.geometry.kmeans_torch): its two reductions, its ``x''`` and its
certificate, on the CPU here and on CUDA where there is one (benchmarks/gpu_check.sh runs these there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.geometry import kmeans_terms as kt
from pipeline.geometry import kmeans_torch as ktorch
from pipeline.geometry.kmeans import assign_exact
from tests.geometry.test_kmeans import mixed_points

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_smallest_two_is_the_top_two(device):
    """The two reductions give topk(2)'s answer: the smallest entry's index (the first of exact ties: the
    certificate fails them anyway) and the smallest of the others, equal to the smallest when tied."""
    rng = np.random.default_rng(3)
    tile = rng.normal(size=(500, 37))
    tile[:50, 5] = tile[:50, 20] = -10.0  # an exact tie for the smallest
    tile[50:60, 3] = -np.inf
    tile[60:70] = 7.0  # every entry tied
    t = torch.from_numpy(tile).to(device)
    j1, second = ktorch.smallest_two(t.clone())
    values, _ = t.topk(2, dim=1, largest=False)
    np.testing.assert_array_equal(j1.cpu().numpy(), tile.argmin(axis=1))
    np.testing.assert_array_equal(second.cpu().numpy(), values[:, 1].cpu().numpy())
    assert (second[:50] == -10.0).all() and (second[60:70] == 7.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_augment_and_fits_agree_with_numpy(device):
    """``x''`` on the device equals numpy's up to the rounding of ``|x - p|^2`` (summation order), and the
    overflow check rejects the same rows, non-finite ones included."""
    rng = np.random.default_rng(5)
    x = mixed_points(rng, 400, 12, 1.0)
    x[7] = 1e160  # would overflow the float64 GEMM
    x[8, 3] = np.nan
    side = kt.Poincare(1.0).side(x[50:80])
    ds = ktorch.device_side(side, torch.device(device))
    xa = ktorch.augment(torch.from_numpy(x).to(device), ds)
    np.testing.assert_allclose(xa.cpu().numpy()[:, :-2], kt._augment(x, side)[:, :-2], rtol=0, atol=0)  # x - p
    np.testing.assert_allclose(xa.cpu().numpy(), kt._augment(x, side), rtol=1e-14)
    np.testing.assert_array_equal(ktorch.fits(xa, ds).cpu().numpy(), kt._fits(kt._augment(x, side), side, kt._U64))
    assert not ktorch.fits(xa, ds).cpu().numpy()[7:9].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", ["poincare", "euclidean"])
def test_a_certified_row_has_the_reference_winner(device, geometry):
    """Every row the device certifies has the reference rule's centroid; exact duplicate centroids and
    coincident points are never certified; most rows are (points up to 1e-10 from the boundary)."""
    rng = np.random.default_rng(11)
    x = mixed_points(rng, 4000, 16, 1.0)
    chosen = x[rng.choice(4000, 80, replace=False)]
    cent = np.concatenate([chosen, chosen[:6]])  # six centroids twice: their own points are exact ties
    geom = kt._geometry(geometry, 1.0)
    side = geom.side(cent)
    ds = ktorch.device_side(side, torch.device(device))
    search = ktorch.queue(x, ds)
    j1, certified = ktorch.collect(search, ds)
    reference, _ = assign_exact(x, cent, 1.0, geometry=geometry)
    assert j1.dtype == np.int32 and certified.dtype == bool
    np.testing.assert_array_equal(j1[certified], reference[certified])
    duplicated = np.isin(reference, np.arange(6)) & (np.abs(x[:, None] - chosen[:6]).sum(axis=2) == 0).any(axis=1)
    assert duplicated.sum() >= 6 and not certified[duplicated].any()
    assert certified.mean() > 0.9


def test_an_empty_block_queues_nothing():
    side = kt.Poincare(1.0).side(np.eye(3) * 0.5)
    ds = ktorch.device_side(side, torch.device("cpu"))
    j1, certified = ktorch.collect(ktorch.queue(np.empty((0, 3)), ds), ds)
    assert j1.shape == certified.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", ["poincare", "euclidean"])
def test_the_ceiling_is_the_cpu_certificates(device, geometry):
    """j1's ceiling on the device is kmeans_tiles._certify's (the same margin), up to the rounding of |x - m|^2's
    sum; a certificate without the margin would not pass."""
    from pipeline.geometry import kmeans_tiles

    rng = np.random.default_rng(4)
    x = mixed_points(rng, 2000, 16, 1.0)
    geom = kt._geometry(geometry, 1.0)
    side = geom.side(x[rng.choice(2000, 50, replace=False)])
    search = ktorch.queue(x, ktorch.device_side(side, torch.device(device)))
    j1 = search.j1.cpu().numpy()
    checked = kmeans_tiles._certify(geom, x, geom.rows(x), side, j1[:, None], np.full(len(x), np.inf))
    ceiling = search.ceiling.cpu().numpy()
    np.testing.assert_allclose(ceiling, checked.ceiling, rtol=32 * kt._U64, atol=0)
    bare = ((x - side.cent[j1]) ** 2).sum(axis=1) * side.weight[j1]
    moved = bare > 0  # (the centroids' own points have t = 0 and a ceiling of 0)
    assert moved.sum() > 1900 and (ceiling[moved] > bare[moved] * (1 + 128 * kt._U64)).all()


def test_rows_that_could_overflow_are_never_certified():
    """Rows whose GEMM entries stay finite but whose bound passes the overflow limit (centroids ~3e150 apart: the
    bound's 2^1000 is exceeded) are left to the CPU, however clear their winner; the same rows at 1e-150 of the
    scale are certified."""
    cent = np.array([[3.0, 0, 0, 0], [-3.0, 0, 0, 0], [0, 3.0, 0, 0]])
    x = cent + 0.01
    for scale, fit in [(1.0, True), (1e150, False)]:
        side = kt.Euclidean().side(cent * scale)
        ds = ktorch.device_side(side, torch.device("cpu"))
        search = ktorch.queue(x * scale, ds)
        j1, certified = ktorch.collect(search, ds)
        assert np.isfinite(search.second.numpy()).all() and (j1 == [0, 1, 2]).all()
        assert search.fits.numpy().all() == fit and certified.all() == fit and certified.any() == fit


def test_the_underflow_term_is_the_cpus():
    """`collect` subtracts kmeans_terms._eta of the block's fitting rows: at coordinates ~1e-160, where eta is
    comparable to the gaps, a row certified by the device is certified by the CPU's bound too."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 3)) * 1e-160
    cent = x[:20] + rng.normal(size=(20, 3)) * 1e-162
    side = kt.Euclidean().side(cent)
    ds = ktorch.device_side(side, torch.device("cpu"))
    search = ktorch.queue(x, ds)
    _, certified = ktorch.collect(search, ds)
    xa = kt._augment(x, side)
    eta = kt._eta(kt._U64, 6, xa[kt._fits(xa, side, kt._U64)], side.big)
    expected = (search.ceiling.numpy() < search.second.numpy() - eta) & search.fits.numpy()
    np.testing.assert_array_equal(certified, expected)
    reference, _ = assign_exact(x, cent, geometry="euclidean")
    np.testing.assert_array_equal(search.j1.numpy()[certified], reference[certified])
