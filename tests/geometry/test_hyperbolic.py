"""Poincaré / Lorentz math of hyperbolic: property tests against geoopt (where geoopt is exact) and against
an mpmath evaluation of the closed-form distance (next to the boundary, where geoopt saturates)."""

from __future__ import annotations

import math

import geoopt
import mpmath
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.geometry import hyperbolic as hyp

CURVATURES = (0.5, 1.0, 2.0)
SETTINGS = settings(max_examples=50, deadline=None)

curvatures = st.sampled_from(CURVATURES)
dims = st.sampled_from((2, 3, 8))


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float64))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@st.composite
def directions(draw, d: int) -> np.ndarray:
    """A unit vector of R^d."""
    v = draw(hnp.arrays(np.float64, d, elements=st.floats(-1, 1, allow_nan=False)))
    assume(np.linalg.norm(v) > 1e-3)
    return unit(v)


@st.composite
def ball_points(draw, d: int, c: float, rmax: float = 0.9) -> np.ndarray:
    """A point of the ball of curvature -c with scaled norm sqrt(c)|x| <= rmax."""
    r = draw(st.floats(0, rmax))
    return draw(directions(d)) * (r / math.sqrt(c))


@st.composite
def boundary_points(draw, d: int, c: float, lo: float = 6.0, hi: float = 10.0) -> np.ndarray:
    """A point with scaled norm 1 - 10^-e, e in [lo, hi] (gap to the boundary 1e-6 .. 1e-10)."""
    e = draw(st.floats(lo, hi))
    return draw(directions(d)) * ((1 - 10.0**-e) / math.sqrt(c))


@st.composite
def any_points(draw, d: int, c: float) -> np.ndarray:
    """Anywhere in the ball: moderate or next to the boundary."""
    if draw(st.booleans()):
        return draw(ball_points(d, c, 0.99))
    return draw(boundary_points(d, c, 1.0, 10.0))


def geo_ball(c: float) -> geoopt.PoincareBall:
    """geoopt's ball with its curvature made in float64 (from a Python float it stores softplus^-1(c) computed in
    float32, which puts c = 0.5 off by ~1e-8)."""
    return geoopt.PoincareBall(c=torch.tensor(c, dtype=torch.float64))


def mp_dist(x, y, c: float) -> mpmath.mpf:
    """arcosh(1 + 2c|x-y|^2 / ((1-c|x|^2)(1-c|y|^2))) / sqrt(c) at 60 digits on the exact float64 coordinates."""
    with mpmath.workdps(60):
        xs = [mpmath.mpf(float(a)) for a in np.asarray(x).ravel()]
        ys = [mpmath.mpf(float(a)) for a in np.asarray(y).ravel()]
        cc = mpmath.mpf(c)
        d2 = mpmath.fsum((a - b) ** 2 for a, b in zip(xs, ys, strict=True))
        nx = mpmath.fsum(a * a for a in xs)
        ny = mpmath.fsum(b * b for b in ys)
        return mpmath.acosh(1 + 2 * cc * d2 / ((1 - cc * nx) * (1 - cc * ny))) / mpmath.sqrt(cc)


def mp_dist0(x, c: float) -> mpmath.mpf:
    with mpmath.workdps(60):
        n = mpmath.sqrt(mpmath.fsum(mpmath.mpf(float(a)) ** 2 for a in np.asarray(x).ravel()))
        sc = mpmath.sqrt(mpmath.mpf(c))
        return 2 * mpmath.atanh(sc * n) / sc


def fp_tol(c: float, *points) -> float:
    """Absolute float64 error budget of a distance between points at these positions: sqrt(c)|x| is rounded by a
    few ulp, i.e. a relative error of ~eps / gap in D(x) = (1 - sqrt(c)|x|)(1 + sqrt(c)|x|), i.e. an absolute
    error of ~(2/sqrt(c)) eps / gap in the distance (the conditioning of the input, whatever the formula)."""
    gap = min(1 - math.sqrt(c) * float(np.linalg.norm(np.asarray(p))) for p in points)
    return 16 / math.sqrt(c) * np.finfo(np.float64).eps / gap


def riemannian_norm(x: np.ndarray, v: np.ndarray, c: float) -> float:
    return float(2 / (1 - c * (x @ x)) * np.linalg.norm(v))


# ---------------------------------------------------------------------------------------- exp / log at 0


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_expmap0_logmap0_round_trip(data, c, d):
    # sqrt(c)|v| <= 5: tanh(5) < 1 - 1e-5, so the projection does not act
    v = data.draw(directions(d)) * data.draw(st.floats(0, 5)) / math.sqrt(c)
    x = hyp.expmap0(t64(v), c)
    np.testing.assert_allclose(hyp.logmap0(x, c).numpy(), v, rtol=1e-9, atol=1e-12)
    y = data.draw(ball_points(d, c, 0.999))
    np.testing.assert_allclose(hyp.expmap0(hyp.logmap0(t64(y), c), c).numpy(), y, rtol=1e-12, atol=1e-15)


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_exp_log_at_origin_and_dist0_match_geoopt(data, c, d):
    ball = geo_ball(c)
    v = t64(data.draw(directions(d)) * data.draw(st.floats(0, 5)) / math.sqrt(c))
    x = t64(data.draw(ball_points(d, c, 0.95)))
    torch.testing.assert_close(hyp.expmap0(v, c), ball.expmap0(v), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hyp.logmap0(x, c), ball.logmap0(x), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(hyp.dist0(x, c), ball.dist0(x), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(hyp.dist0(x, c), hyp.dist(x, torch.zeros_like(x), c), rtol=1e-12, atol=1e-14)


def _huge_tangent_vectors(dtype: torch.dtype, scale: float) -> torch.Tensor:
    v = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 5)), dtype=dtype)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True) * scale


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize(
    ("dtype", "scales"),
    [(torch.float32, (20.0, 1e3, 1e8, 1e15, 1e18)), (torch.float64, (20.0, 1e3, 1e8, 1e15, 1e100, 1e150))],
)
def test_expmap0_of_huge_tangent_vectors_stays_strictly_inside(c, dtype, scales):
    for scale in scales:
        v = _huge_tangent_vectors(dtype, scale)
        x = hyp.expmap0(v, c)
        assert x.dtype == dtype
        assert torch.isfinite(x).all()
        n = torch.linalg.vector_norm(x.double(), dim=-1)
        assert (n < 1 / math.sqrt(c)).all(), (scale, n.max().item())
        # lands on the projection radius (1 - eps) / sqrt(c), in the direction of v, as geoopt's expmap0 does
        eps = hyp.BALL_EPS[dtype]
        torch.testing.assert_close(n, torch.full_like(n, (1 - eps) / math.sqrt(c)), rtol=1e-6, atol=0)
        cos = (x.double() * v.double()).sum(-1) / (n * torch.linalg.vector_norm(v.double(), dim=-1))
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-6)
        assert torch.isfinite(hyp.dist0(x, c)).all()
        assert torch.isfinite(hyp.to_lorentz(x, c)).all()
    # the same with project=False never leaves the closed ball
    n = torch.linalg.vector_norm(hyp.expmap0(_huge_tangent_vectors(dtype, 1e8), c, project=False).double(), dim=-1)
    assert (n <= 1 / math.sqrt(c) * (1 + 1e-6)).all()


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e20), (torch.float64, 1e200)])
def test_expmap0_of_overflowing_tangent_vectors_goes_to_the_boundary(dtype, scale):
    x = hyp.expmap0(_huge_tangent_vectors(dtype, scale), 1.0)
    n = torch.linalg.vector_norm(x.double(), dim=-1)
    torch.testing.assert_close(n, torch.full_like(n, 1 - hyp.BALL_EPS[dtype]), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------- Möbius addition


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_mobius_add_matches_geoopt(data, c, d):
    ball = geo_ball(c)
    x = t64(data.draw(ball_points(d, c, 0.95)))
    y = t64(data.draw(ball_points(d, c, 0.95)))
    torch.testing.assert_close(hyp.mobius_add(x, y, c), ball.mobius_add(x, y), rtol=1e-10, atol=1e-13)
    # (-x) (+) x = 0 and 0 (+) y = y
    torch.testing.assert_close(hyp.mobius_add(-x, x, c), torch.zeros_like(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(hyp.mobius_add(torch.zeros_like(y), y, c), y, rtol=1e-14, atol=1e-15)


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_mobius_translation_is_an_isometry(data, c, d):
    # translation by points up to 1e-6 from the boundary (each output coordinate is then known to ~eps / gap)
    a = t64(data.draw(st.one_of(ball_points(d, c, 0.99), boundary_points(d, c, 1.0, 6.0))))
    x = t64(data.draw(ball_points(d, c, 0.9)))
    y = t64(data.draw(ball_points(d, c, 0.9)))
    ax, ay = hyp.mobius_add(a, x, c), hyp.mobius_add(a, y, c)
    before, after = float(hyp.dist(x, y, c)), float(hyp.dist(ax, ay, c))
    assert after == pytest.approx(before, rel=1e-9, abs=4 * fp_tol(c, ax.numpy(), ay.numpy()))


# ----------------------------------------------------------------------------------------------- distance


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_dist_matches_geoopt_where_geoopt_is_exact(data, c, d):
    ball = geo_ball(c)
    x = t64(data.draw(ball_points(d, c, 0.9)))
    y = t64(data.draw(ball_points(d, c, 0.9)))
    torch.testing.assert_close(hyp.dist(x, y, c), ball.dist(x, y), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_dist_matches_mpmath_next_to_the_boundary(data, c, d):
    x = data.draw(boundary_points(d, c))
    y = data.draw(st.one_of(boundary_points(d, c), ball_points(d, c, 0.9)))
    ours = float(hyp.dist(t64(x), t64(y), c))
    ref = float(mp_dist(x, y, c))
    # relative error ~eps / gap <= ~1e-6 at any distance; in absolute terms within the float64 budget
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-12)
    assert abs(ours - ref) <= 1e-12 * ref + fp_tol(c, x, y)
    ours0 = float(hyp.dist0(t64(x), c))
    ref0 = float(mp_dist0(x, c))
    assert abs(ours0 - ref0) <= 1e-12 * ref0 + fp_tol(c, x)


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("gap", [1e-6, 1e-8, 1e-10])
def test_dist_separates_far_boundary_pairs_that_geoopt_saturates(c, gap):
    ball = geo_ball(c)
    r = (1 - gap) / math.sqrt(c)
    x = np.array([r, 0.0, 0.0])
    others = [
        np.array([0.0, r, 0.0]),  # 90 degrees
        r * unit(np.array([-0.6, 0.8, 0.0])),  # ~127 degrees
        np.array([-r, 0.0, 0.0]),  # antipodal
        r * unit(np.array([1.0, 1e-3, 0.0])),  # 1e-3 rad
    ]
    ours = np.array([float(hyp.dist(t64(x), t64(y), c)) for y in others])
    ref = np.array([float(mp_dist(x, y, c)) for y in others])
    np.testing.assert_allclose(ours, ref, rtol=1e-7)
    assert np.all(np.diff(ours[:3]) > 0), ours  # wider angle, farther
    assert np.all(np.argsort(ours) == np.argsort(ref))
    geo = np.array([float(ball.dist(t64(x), t64(y))) for y in others])
    # geoopt's artanh argument clamps below 1: every far pair gets the same capped value
    if gap <= 1e-8:
        assert geo[0] == geo[1] == geo[2]
        assert np.all(geo[:3] < ref[:3] - 1)


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_dist_symmetry_triangle_identity(data, c, d):
    x, y, z = (t64(data.draw(any_points(d, c))) for _ in range(3))
    dxy, dyx, dxz, dyz = hyp.dist(x, y, c), hyp.dist(y, x, c), hyp.dist(x, z, c), hyp.dist(y, z, c)
    assert float(dxy) == float(dyx)
    assert float(hyp.dist(x, x, c)) == 0.0
    assert float(dxy) >= 0
    tol = 3 * fp_tol(c, x.numpy(), y.numpy(), z.numpy())
    assert float(dxz) <= float(dxy + dyz) * (1 + 1e-12) + tol


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_dist_is_accurate_for_tiny_separations(data, c, d):
    x = data.draw(any_points(d, c))
    assume(math.sqrt(c) * np.linalg.norm(x) < 1 - 1e-8)
    delta = data.draw(directions(d)) * 10.0 ** data.draw(st.floats(-14, -9))
    y = x + delta * (1 - c * (x @ x))  # a hyperbolic step of ~ 2|delta|
    ours = float(hyp.dist(t64(x), t64(y), c))
    assert ours == pytest.approx(float(mp_dist(x, y, c)), rel=1e-5)


def test_dist_gradient_is_finite_at_coincident_and_boundary_points():
    x = torch.tensor([[0.3, -0.2], [1 - 1e-9, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.3, -0.2], [0.0, 1 - 1e-9]], dtype=torch.float64)
    hyp.dist(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[0], torch.zeros(2, dtype=torch.float64))


def test_dist_gradcheck_inside_the_ball():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.uniform(-0.4, 0.4, (4, 3)), requires_grad=True)
    y = torch.tensor(rng.uniform(-0.4, 0.4, (4, 3)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hyp.dist(a, b, 2.0), (x, y))


def test_numpy_inputs_give_float64_numpy_outputs():
    x = np.array([[0.1, 0.2], [0.5, -0.3]], dtype=np.float32)
    y = np.array([0.0, 0.4])
    out = hyp.dist(x, y, c=1.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2,)
    np.testing.assert_allclose(out, hyp.dist(t64(x), t64(y)).numpy(), rtol=1e-15)
    assert isinstance(hyp.expmap0(y), np.ndarray)


# ------------------------------------------------------------------------------------------ exp / log at x


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_expmap_logmap_match_geoopt_and_round_trip(data, c, d):
    ball = geo_ball(c)
    x = data.draw(ball_points(d, c, 0.8))
    y = data.draw(ball_points(d, c, 0.8))
    xt, yt = t64(x), t64(y)
    v = hyp.logmap(xt, yt, c)
    torch.testing.assert_close(v, ball.logmap(xt, yt), rtol=1e-9, atol=1e-12)
    assert riemannian_norm(x, v.numpy(), c) == pytest.approx(float(hyp.dist(xt, yt, c)), rel=1e-10, abs=1e-14)
    torch.testing.assert_close(hyp.expmap(xt, v, c), yt, rtol=1e-10, atol=1e-12)
    # a tangent vector of Riemannian length s moves x by hyperbolic distance s
    s = data.draw(st.floats(0, 3))
    u = t64(data.draw(directions(d)) * s * (1 - c * (x @ x)) / 2)
    torch.testing.assert_close(hyp.expmap(xt, u, c), ball.expmap(xt, u), rtol=1e-10, atol=1e-12)
    assert float(hyp.dist(xt, hyp.expmap(xt, u, c), c)) == pytest.approx(s, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------------------------- Lorentz


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_lorentz_round_trip_and_hyperboloid(data, c, d):
    x = data.draw(any_points(d, c))
    z = hyp.to_lorentz(t64(x), c)
    assert z.shape == (d + 1,)
    assert float(z[0]) > 0
    z0 = float(z[0])
    # <z, z>_L = -1/c, up to the rounding of z0^2
    assert abs(c * float(hyp.lorentz_inner(z, z)) + 1) <= 1e-13 * c * z0 * z0 + 1e-13
    np.testing.assert_allclose(hyp.from_lorentz(z, c).numpy(), x, rtol=1e-13, atol=1e-15)
    # Klein coordinates and Lorentz factor: z_{1:} / (sqrt(c) z_0) = 2x / (1 + c|x|^2)
    np.testing.assert_allclose(z[1:].numpy() / (math.sqrt(c) * z0), 2 * x / (1 + c * (x @ x)), rtol=1e-12, atol=1e-15)


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_lorentz_dist_equals_poincare_dist(data, c, d):
    x = t64(data.draw(ball_points(d, c, 0.95)))
    y = t64(data.draw(ball_points(d, c, 0.95)))
    ld = hyp.lorentz_dist(hyp.to_lorentz(x, c), hyp.to_lorentz(y, c), c)
    # arcosh cancels near 1: absolute error ~ sqrt(eps z0 w0)
    torch.testing.assert_close(ld, hyp.dist(x, y, c), rtol=1e-9, atol=2e-6)


@pytest.mark.parametrize("c", CURVATURES)
def test_lorentz_dist_far_boundary_pairs(c):
    r = (1 - 1e-7) / math.sqrt(c)
    x, y = np.array([r, 0.0]), r * unit(np.array([-0.3, 1.0]))
    ld = float(hyp.lorentz_dist(hyp.to_lorentz(t64(x), c), hyp.to_lorentz(t64(y), c), c))
    assert ld == pytest.approx(float(mp_dist(x, y, c)), rel=1e-9)


# ---------------------------------------------------------------------------------------- midpoints / means


def symmetric_set(rng: np.random.Generator, d: int, c: float, m: int, rmax: float) -> np.ndarray:
    """2m points symmetric about the origin: {p_i, -p_i}."""
    p = rng.normal(size=(m, d))
    p = p / np.linalg.norm(p, axis=1, keepdims=True) * rng.uniform(0.05, rmax, (m, 1)) / math.sqrt(c)
    return np.concatenate([p, -p])


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims, seed=st.integers(0, 2**32 - 1), m=st.integers(1, 6))
def test_einstein_midpoint_and_frechet_mean_agree_on_symmetric_sets(data, c, d, seed, m):
    rng = np.random.default_rng(seed)
    centre = data.draw(ball_points(d, c, 0.99))
    pts = symmetric_set(rng, d, c, m, 0.9)
    # Möbius translation by `centre`: an isometry that maps the origin to `centre`
    x = hyp.mobius_add(t64(np.broadcast_to(centre, pts.shape)), t64(pts), c)
    w = t64(np.tile(rng.uniform(0.1, 2.0, m), 2))  # equal weights within a symmetric pair
    for weights in (None, w):
        em = hyp.einstein_midpoint(x, weights, c)
        fm = hyp.frechet_mean(x, weights, c)
        # distances measured hyperbolically: the positions are only known to ~eps / gap
        assert float(hyp.dist(em, t64(centre), c)) < 1e-7
        assert float(hyp.dist(fm, t64(centre), c)) < 1e-7
        assert float(hyp.dist(em, fm, c)) < 1e-7


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_midpoint_and_mean_of_a_single_point_is_that_point(data, c, d):
    x = t64(data.draw(any_points(d, c)))
    em = hyp.einstein_midpoint(x[None], c=c)
    fm = hyp.frechet_mean(x[None], c=c)
    assert em.shape == fm.shape == x.shape
    torch.testing.assert_close(em, x, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fm, x, rtol=1e-12, atol=1e-15)
    # and of the same point repeated with weights
    em3 = hyp.einstein_midpoint(x.expand(3, d), t64([0.2, 1.0, 3.0]), c)
    torch.testing.assert_close(em3, x, rtol=1e-12, atol=1e-15)


@SETTINGS
@given(data=st.data(), c=curvatures, d=dims)
def test_midpoint_of_two_points_is_the_geodesic_midpoint(data, c, d):
    a = t64(data.draw(ball_points(d, c, 0.99)))
    b = t64(data.draw(ball_points(d, c, 0.99)))
    m = hyp.einstein_midpoint(torch.stack([a, b]), c=c)
    dab = float(hyp.dist(a, b, c))
    assert float(hyp.dist(m, a, c)) == pytest.approx(dab / 2, rel=1e-7, abs=1e-9)
    assert float(hyp.dist(m, b, c)) == pytest.approx(dab / 2, rel=1e-7, abs=1e-9)


def test_einstein_midpoint_of_a_tight_cluster_next_to_the_boundary():
    c = 1.0
    rng = np.random.default_rng(3)
    centre = unit(rng.normal(size=4)) * (1 - 1e-9)
    # points within hyperbolic distance ~1e-3 of `centre`, symmetric about it in the tangent space
    u = rng.normal(size=(5, 4)) * 1e-3 * (1 - centre @ centre) / 2
    u = np.concatenate([u, -u])
    x = hyp.expmap(t64(np.broadcast_to(centre, u.shape)), t64(u), c, project=False)
    em = hyp.einstein_midpoint(x, c=c)
    assert float(hyp.dist(em, t64(centre), c)) < 1e-6
    assert float(hyp.dist(hyp.frechet_mean(x, c=c), t64(centre), c)) < 1e-6


def test_grouped_midpoints_match_per_group_calls():
    rng = np.random.default_rng(4)
    c = 2.0
    x = rng.normal(size=(40, 3))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0, 0.999, (40, 1)) / math.sqrt(c)
    groups = rng.integers(0, 3, 40)
    groups[:3] = [0, 1, 2]
    w = rng.uniform(0.5, 1.5, 40)
    em = hyp.einstein_midpoint(x, w, c, groups=groups, n_groups=4)
    fm = hyp.frechet_mean(x, w, c, groups=groups, n_groups=3)
    assert isinstance(em, np.ndarray) and em.shape == (4, 3) and fm.shape == (3, 3)
    assert np.isnan(em[3]).all()  # empty group
    for g in range(3):
        sel = groups == g
        np.testing.assert_allclose(em[g], hyp.einstein_midpoint(x[sel], w[sel], c), rtol=1e-12, atol=1e-15)
        single = hyp.frechet_mean(x[sel], w[sel], c)
        assert float(hyp.dist(fm[g], single, c)) < 1e-8


def test_frechet_mean_minimises_the_sum_of_squared_distances():
    rng = np.random.default_rng(5)
    c = 1.0
    x = rng.normal(size=(30, 3))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.5, 0.99, (30, 1))
    m = hyp.frechet_mean(x, c=c)

    def cost(p):
        return float((hyp.dist(x, p, c) ** 2).sum())

    base = cost(m)
    for _ in range(20):
        v = rng.normal(size=3) * 1e-3 * (1 - m @ m) / 2
        assert cost(hyp.expmap(m, v, c)) >= base - 1e-9
    # the Einstein midpoint (its starting point) is not the minimiser on this asymmetric set
    assert cost(hyp.einstein_midpoint(x, c=c)) >= base


def test_midpoint_input_validation():
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError):
        hyp.einstein_midpoint(x, groups=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        hyp.frechet_mean(torch.zeros(2, 4, 2, dtype=torch.float64))
