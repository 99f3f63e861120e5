"""The GEMM's terms of the nearest-centroid assignment (kmeans_terms): every entry ``x'' . y''_j`` computed in
float32 or float64, less the underflow term, is a lower bound of ``t_j = a_j |x - y_j|^2`` (worked out here in
extended precision), and no looser than the bound the certificate allows for, in both geometries, next to the
boundary and far from the centroids' mean."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.geometry import kmeans_terms as kt
from tests.geometry.test_kmeans import mixed_points


@pytest.mark.parametrize("geometry", ["poincare", "euclidean"])
@pytest.mark.parametrize("d", [2, 16, 256])
def test_every_gemm_entry_is_a_lower_bound_of_t(geometry, d):
    rng = np.random.default_rng(d)
    x = mixed_points(rng, 400, d, 1.0)
    cent = np.concatenate([x[:30], mixed_points(rng, 30, d, 1.0)])
    geom = kt._geometry(geometry, 1.0)
    side = geom.side(cent)
    xa = kt._augment(x, side)
    diff = x[:, None, :].astype(np.longdouble) - cent[None, :, :].astype(np.longdouble)
    t = (diff * diff).sum(-1) * side.weight[None].astype(np.longdouble)
    r = np.sqrt(xa[:, -2:-1])  # |x - p|
    s = np.linalg.norm(cent - side.centre, axis=1)[None]
    scale = side.weight[None] * (r + s) ** 2  # a_j (r + s_j)^2: what the rounding is relative to
    shift = side.weight[None] * (r**2 + s**2)  # a_j (r^2 + s_j^2): what the shift is relative to
    for unit, base, xs in ((kt._U32, side.base32, xa.astype(np.float32)), (kt._U64, side.base, xa)):
        entry = (xs @ base).astype(np.float64) - kt._eta(unit, d + 2, xa, side.big)
        assert (entry <= t).all()
        # the shift is beta of a_j (r^2 + s_j^2), the rounding at most gamma of a_j (r + s_j)^2
        slack = kt._beta(d, unit) * shift + 1.01 * kt._gamma(d + 2, unit) * scale
        assert (t - entry <= slack + 1e-300).all()
