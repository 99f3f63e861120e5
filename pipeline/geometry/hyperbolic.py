"""Poincaré-ball and hyperboloid (Lorentz) math for curvature -c, c > 0.

Conventions (the same as geoopt's ``PoincareBall(c)``, whose sectional curvature is ``k = -c``):

- Poincaré ball ``B = {x in R^d : c |x|^2 < 1}``, radius ``1/sqrt(c)``, conformal factor ``lambda_x = 2 / D(x)``
  with ``D(x) = 1 - c|x|^2``, always computed as ``(1 - sqrt(c)|x|)(1 + sqrt(c)|x|)`` (no cancellation near the
  boundary) and clamped to stay positive.
- Hyperboloid ``H = {z in R^(d+1) : <z, z>_L = -1/c, z_0 > 0}`` with ``<u, v>_L = -u_0 v_0 + sum_i u_i v_i``.
  The isometry ``B -> H`` is ``z_0 = (1 + c|x|^2) / (sqrt(c) D(x))``, ``z_i = 2 x_i / D(x)``; its inverse is
  ``x = z_{1:} / (1 + sqrt(c) z_0)``. Distance on ``H``: ``arcosh(-c <z, w>_L) / sqrt(c)``.
- The Klein coordinates of ``x`` are ``2x / (1 + c|x|^2) = z_{1:} / (sqrt(c) z_0)``, with Lorentz factor
  ``gamma = sqrt(c) z_0``; the Einstein midpoint is therefore the normalised Lorentzian (weighted) sum.

Every function takes torch tensors (differentiable, float32 or float64, points on the last axis, leading axes
broadcast) and returns tensors. NumPy arrays are accepted too: floating arrays are converted to float64 and the
result comes back as float64 NumPy arrays (the clustering path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

Array = TypeVar("Array", Tensor, np.ndarray)

#: geoopt's BALL_EPS: projection keeps sqrt(c)|x| <= 1 - eps.
BALL_EPS: dict[torch.dtype, float] = {torch.float32: 4e-3, torch.float64: 1e-5}
_MIN_NORM = 1e-15  # floor for norms that are divided by (as geoopt)


def _numpy_compatible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let ``fn`` take NumPy arrays: floating ones become float64 tensors, integer ones int64; results come back
    as NumPy arrays."""

    def convert(a: Any) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        if a.dtype.kind in "iu":
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(a, np.ndarray) for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        with torch.no_grad():
            out = fn(*(convert(a) for a in args), **{k: convert(v) for k, v in kwargs.items()})
        return out.numpy() if isinstance(out, Tensor) else out

    return wrapper


def _norm(x: Tensor) -> Tensor:
    """Euclidean norm over the last axis, kept (gradient 0 at 0)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _gap(r: Tensor) -> Tensor:
    """``1 - r`` for a scaled norm ``r = sqrt(c)|x|``, clamped to the smallest positive gap of the dtype."""
    return (1 - r).clamp_min(torch.finfo(r.dtype).eps / 2)


def _below1(r: Tensor) -> Tensor:
    """``r`` clamped to the largest value below 1 of its dtype (so artanh stays finite)."""
    return r.clamp_max(1 - torch.finfo(r.dtype).eps / 2)


def _den(x: Tensor, c: float) -> Tensor:
    """``D(x) = 1 - c|x|^2`` as ``(1 - sqrt(c)|x|)(1 + sqrt(c)|x|)``, kept last axis, > 0."""
    r = c**0.5 * _norm(x)
    return _gap(r) * (1 + r)


def _project(x: Tensor, c: float = 1.0, eps: float | None = None) -> Tensor:
    """Clamp points into the ball as geoopt does: rows with ``|x| > (1 - eps)/sqrt(c)`` are rescaled to that norm.

    ``eps`` defaults to geoopt's BALL_EPS for the dtype (4e-3 for float32, 1e-5 for float64).
    """
    if eps is None:
        eps = BALL_EPS.get(x.dtype, 4e-3)
    maxnorm = (1 - eps) / c**0.5
    n = _norm(x).clamp_min(_MIN_NORM)
    return torch.where(n > maxnorm, x / n * maxnorm, x)


project = _numpy_compatible(_project)


@_numpy_compatible
def expmap0(v: Array, c: float = 1.0, project: bool = True) -> Array:
    """Exponential map at the origin: ``tanh(sqrt(c)|v|) v / (sqrt(c)|v|)``, then `project` unless
    ``project=False`` (so huge tangent vectors still land strictly inside the ball)."""
    n = _norm(v)
    s = c**0.5 * n.clamp_min(_MIN_NORM)
    x = v * (torch.tanh(s) / s)
    overflow = torch.isinf(n)
    if overflow.any():  # |v|^2 overflowed: tanh(s) = 1, the direction comes from a rescaled v
        u = v / v.abs().amax(dim=-1, keepdim=True)
        x = torch.where(overflow, u / _norm(u) / c**0.5, x)
    return _project(x, c) if project else x


@_numpy_compatible
def logmap0(y: Array, c: float = 1.0) -> Array:
    """Logarithmic map at the origin: ``artanh(sqrt(c)|y|) y / (sqrt(c)|y|)`` (inverse of `expmap0`)."""
    r = c**0.5 * _norm(y).clamp_min(_MIN_NORM)
    return y * (torch.atanh(_below1(r)) / r)


def _mobius_add(x: Tensor, y: Tensor, c: float, dx: Tensor, dy: Tensor) -> Tensor:
    """``x (+) y`` given ``D(x)``, ``D(y)``, in the cancellation-free form with ``s = x + y``:
    ``(c|s|^2 x + D(x) s) / (D(x) D(y) + c|s|^2)``."""
    s = x + y
    cs2 = c * (s * s).sum(-1, keepdim=True)
    return (cs2 * x + dx * s) / (dx * dy + cs2)


@_numpy_compatible
def mobius_add(x: Array, y: Array, c: float = 1.0) -> Array:
    """Möbius addition ``x (+) y`` in the ball of curvature -c (geoopt's ``mobius_add``), computed stably."""
    return _mobius_add(x, y, c, _den(x, c), _den(y, c))


@_numpy_compatible
def dist(x: Array, y: Array, c: float = 1.0) -> Array:
    """Geodesic distance ``arcosh(1 + 2c|x-y|^2 / (D(x) D(y))) / sqrt(c)`` over the last axis (broadcasts).

    Evaluated as ``2/sqrt(c) * arsinh(sqrt(c)|x-y| / sqrt(D(x) D(y)))`` (``arcosh(1 + 2s^2) = 2 arsinh(s)``) with
    ``D = (1 - sqrt(c)|x|)(1 + sqrt(c)|x|)``: accurate for tiny distances and next to the boundary alike, and
    differentiable everywhere (gradient 0 at ``x == y``).
    """
    sc = c**0.5
    diff = _norm(x - y)
    arg = sc * diff / (_den(x, c).sqrt() * _den(y, c).sqrt())
    return (2 / sc) * torch.asinh(arg).squeeze(-1)


@_numpy_compatible
def dist0(x: Array, c: float = 1.0) -> Array:
    """Distance to the origin ``2/sqrt(c) * artanh(sqrt(c)|x|)`` (argument clamped below 1)."""
    r = c**0.5 * _norm(x)
    return ((2 / c**0.5) * torch.atanh(_below1(r))).squeeze(-1)


@_numpy_compatible
def logmap(x: Array, y: Array, c: float = 1.0) -> Array:
    """Logarithmic map at ``x`` of ``y``: the tangent vector at ``x`` (ambient coordinates) whose Riemannian norm is
    ``dist(x, y)``; equals geoopt's ``logmap(x, y)``. Direction ``(-x) (+) y`` in the stable form
    ``D(x)(y - x) - c|y - x|^2 x``, length ``dist(x, y) / lambda_x``."""
    dx = _den(x, c)
    s = y - x
    direction = dx * s - c * (s * s).sum(-1, keepdim=True) * x
    return direction / _norm(direction).clamp_min(_MIN_NORM) * (dist(x, y, c).unsqueeze(-1) * dx / 2)


@_numpy_compatible
def expmap(x: Array, v: Array, c: float = 1.0, project: bool = True) -> Array:
    """Exponential map at ``x`` of the tangent vector ``v``: ``x (+) tanh(sqrt(c) lambda_x |v| / 2) v/(sqrt(c)|v|)``
    (geoopt's ``expmap``), then `project` unless ``project=False``."""
    sc = c**0.5
    dx = _den(x, c)
    nv = _norm(v).clamp_min(_MIN_NORM)
    t = sc * nv / dx  # sqrt(c) lambda_x |v| / 2
    y = v * (torch.tanh(t) / (sc * nv))
    dy = 1 / torch.cosh(t) ** 2  # 1 - tanh(t)^2 without cancellation
    out = _mobius_add(x, y, c, dx, dy)
    return _project(out, c) if project else out


@_numpy_compatible
def to_lorentz(x: Array, c: float = 1.0) -> Array:
    """Ball -> hyperboloid: ``z_0 = (1 + c|x|^2) / (sqrt(c) D(x))``, ``z_{1:} = 2x / D(x)``; shape (..., d+1)."""
    sc = c**0.5
    r = sc * _norm(x)
    d = _gap(r) * (1 + r)
    return torch.cat([(1 + r * r) / (sc * d), 2 * x / d], dim=-1)


@_numpy_compatible
def from_lorentz(z: Array, c: float = 1.0) -> Array:
    """Hyperboloid -> ball: ``x = z_{1:} / (1 + sqrt(c) z_0)``; shape (..., d)."""
    return z[..., 1:] / (1 + c**0.5 * z[..., :1])


@_numpy_compatible
def lorentz_inner(u: Array, v: Array) -> Array:
    """Minkowski inner product ``-u_0 v_0 + sum_i u_i v_i`` over the last axis."""
    prod = u * v
    return prod[..., 1:].sum(-1) - prod[..., 0]


@_numpy_compatible
def lorentz_dist(z: Array, w: Array, c: float = 1.0) -> Array:
    """Distance on the hyperboloid ``arcosh(-c <z, w>_L) / sqrt(c)``.

    The argument is clamped to ``>= 1 + eps`` (finite gradients); it cancels catastrophically for small
    distances (absolute error ~ sqrt(eps * z_0 w_0)): prefer `dist` on ball coordinates.
    """
    arg = (-c * lorentz_inner(z, w)).clamp_min(1 + torch.finfo(z.dtype).eps)
    return torch.acosh(arg) / c**0.5


def _reduce(v: Tensor, groups: Tensor | None, n_groups: int | None) -> Tensor:
    """Sum over the point axis (-2), or per group into (n_groups, ...) when ``groups`` is given."""
    if groups is None:
        return v.sum(-2)
    out = v.new_zeros((n_groups, *v.shape[1:]))
    return out.index_add(0, groups, v)


def _check_groups(x: Tensor, groups: Tensor | None, n_groups: int | None) -> int | None:
    if groups is None:
        return None
    if x.dim() != 2 or groups.shape != x.shape[:1]:
        raise ValueError(
            f"groups needs x of shape (n, d) and groups of shape (n,); got {tuple(x.shape)}, {tuple(groups.shape)}"
        )
    return int(groups.max()) + 1 if n_groups is None else n_groups


@_numpy_compatible
def einstein_midpoint(
    x: Array,
    weights: Array | None = None,
    c: float = 1.0,
    *,
    groups: Array | None = None,
    n_groups: int | None = None,
) -> Array:
    """Weighted Einstein midpoint of the points ``x`` (..., n, d) -> (..., d), or per group when ``groups`` (n,)
    int gives each row of ``x`` (n, d) a group in ``[0, n_groups)`` -> (n_groups, d) (empty groups give NaN).

    Closed form: the Klein-model midpoint ``sum w gamma k / sum w gamma``, i.e. the Lorentzian sum
    ``S = sum w z`` normalised onto the hyperboloid, mapped back to the ball: ``x = S_{1:} / (nu + sqrt(c) S_0)``
    with ``nu^2 = c (S_0 - |S_{1:}|)(S_0 + |S_{1:}|)``. ``S_0 - |S_{1:}|`` is accumulated term by term as
    ``sum w [(1 - r)/(sqrt(c)(1 + r)) + |z_{1:}| |u - x/|x||^2 / 2]`` (``u`` the unit direction of ``S_{1:}``,
    ``r = sqrt(c)|x|``), so tight clusters next to the boundary keep full precision. Weights must be >= 0, not all 0.
    For two points with equal weights this is the geodesic midpoint; it equals the Fréchet mean on symmetric sets.
    """
    n_groups = _check_groups(x, groups, n_groups)
    sc = c**0.5
    nx = _norm(x)
    r = sc * nx
    gap = _gap(r)
    d = gap * (1 + r)
    w = x.new_ones(()) if weights is None else weights.to(x.dtype).unsqueeze(-1)
    s0 = _reduce(w * (1 + r * r) / (sc * d), groups, n_groups)  # (..., 1)
    ss = _reduce(w * (2 * x / d), groups, n_groups)  # (..., d)
    ns = _norm(ss)
    e1 = torch.zeros_like(ss)
    e1[..., 0] = 1
    u = torch.where(ns > 0, ss / ns.clamp_min(torch.finfo(x.dtype).tiny), e1)
    u_rows = u.unsqueeze(-2) if groups is None else u[groups]
    xhat = x / nx.clamp_min(_MIN_NORM)
    angle = ((u_rows - xhat) ** 2).sum(-1, keepdim=True) / 2  # 1 - cos(angle between u and x)
    lower = _reduce(w * (gap / (sc * (1 + r)) + (2 * nx / d) * angle), groups, n_groups)  # S_0 - |S_{1:}|
    nu = (c * lower * (s0 + ns)).sqrt()
    return ss / (nu + sc * s0)


@_numpy_compatible
def frechet_mean(
    x: Array,
    weights: Array | None = None,
    c: float = 1.0,
    *,
    groups: Array | None = None,
    n_groups: int | None = None,
    iters: int = 100,
    tol: float = 1e-10,
) -> Array:
    """Weighted Fréchet (Karcher) mean: minimiser of ``sum w dist(m, x)^2``, for ``x`` (n, d) -> (d,), or per group
    as in `einstein_midpoint` -> (n_groups, d).

    Riemannian gradient descent ``m <- expmap(m, sum w logmap(m, x) / (L sum w))`` started at the Einstein midpoint,
    with ``L = mean_w sqrt(c) d coth(sqrt(c) d)`` (``d = dist(m, x)``), the largest Hessian eigenvalue of
    ``d^2/2`` in curvature -c: a unit step (the Euclidean rule) overshoots and diverges for spread-out points.
    Stops after ``iters`` steps or when every step moves the mean by less than ``tol`` (hyperbolic distance).
    """
    if groups is None and x.dim() != 2:
        raise ValueError(f"frechet_mean needs x of shape (n, d), got {tuple(x.shape)}")
    n_groups = _check_groups(x, groups, n_groups)
    w = x.new_ones(x.shape[0]) if weights is None else weights.to(x.dtype)
    sc = c**0.5
    m = einstein_midpoint(x, w, c, groups=groups, n_groups=n_groups)
    total = _reduce(w.unsqueeze(-1), groups, n_groups)
    for _ in range(iters):
        m_rows = m if groups is None else m[groups]
        d = dist(m_rows, x, c).unsqueeze(-1)
        # curvature bound of the Hessian of d^2/2: eigenvalues in [1, sqrt(c) d coth(sqrt(c) d)]
        sd = (sc * d).clamp_min(1e-6)
        lip = _reduce(w.unsqueeze(-1) * sd / torch.tanh(sd), groups, n_groups) / total
        step = _reduce(w.unsqueeze(-1) * logmap(m_rows, x, c), groups, n_groups) / (total * lip)
        moved = 2 * _norm(step) / _den(m, c)  # Riemannian length lambda_m |step| = distance moved
        m = expmap(m, step, c, project=False)
        if not bool((moved > tol).any()):
            break
    return m
