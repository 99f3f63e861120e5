"""k-means (pipeline.geometry.kmeans): recovery of separated clusters (also next to the boundary), the certified
assignment (float32 / float64 GEMM, faiss float32) against a float64 brute force, determinism, empty clusters, Euclidean
k-means, errors, choosing k. Streaming and the shared Lloyd loop: test_kmeans_streaming.py; property tests
of the assignment and its engines: test_kmeans_assign.py."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from pipeline.errors import PipelineError
from pipeline.geometry import hyperbolic as hyp
from pipeline.geometry import kmeans as km
from pipeline.geometry import kmeans_assign as ka
from pipeline.geometry import kmeans_blocks as kb
from pipeline.geometry import kmeans_engines as ke
from pipeline.geometry.kmeans import (
    KMeansResult,
    assign,
    assign_exact,
    euclidean_kmeans,
    hyperbolic_kmeans,
    inertia_curve,
    knee,
)

CURVATURES = (0.5, 1.0, 2.0)


# ------------------------------------------------------------------------------------------------ data


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    u = rng.normal(size=(n, d))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def hyperbolic_blobs(
    rng: np.random.Generator, centres: np.ndarray, n_per: int, spread: float, c: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Points within hyperbolic distance ``spread`` (curvature -1) of each centre (given in the unit ball), then
    scaled into the ball of curvature -c (a similarity: every distance is divided by sqrt(c))."""
    k, d = centres.shape
    xs, labels = [], []
    for j, m in enumerate(centres):
        # tangent vectors at m of Riemannian length s: Euclidean length s * D(m) / 2
        s = spread * rng.uniform(0, 1, (n_per, 1)) ** (1 / d)
        v = unit_rows(rng, n_per, d) * s * (1 - m @ m) / 2
        xs.append(hyp.expmap(np.broadcast_to(m, v.shape), v, 1.0))
        labels.append(np.full(n_per, j))
    x = np.concatenate(xs) / math.sqrt(c)
    return x, np.concatenate(labels)


def mixed_points(rng: np.random.Generator, n: int, d: int, c: float) -> np.ndarray:
    """A third inside (sqrt(c)|x| < 0.9), a third at gaps 1e-1..1e-4, a third at gaps 1e-4..1e-10 from the boundary."""
    kind = rng.integers(0, 3, n)
    r = np.where(
        kind == 0,
        rng.uniform(0, 0.9, n),
        np.where(kind == 1, 1 - 10 ** -rng.uniform(1, 4, n), 1 - 10 ** -rng.uniform(4, 10, n)),
    )
    return unit_rows(rng, n, d) * r[:, None] / math.sqrt(c)


def brute_force(x: np.ndarray, cent: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid in float64 with the closed form: dist = arcosh(1 + 2c|x-m|^2 / (D(x) D(m))) / sqrt(c) is
    increasing in |x-m|^2 / D(m); D = (1 - sqrt(c)|.|)(1 + sqrt(c)|.|) has no cancellation at the boundary."""
    sc = math.sqrt(c)

    def den(p):
        r = sc * np.linalg.norm(p, axis=1)
        return (1 - r) * (1 + r)

    diff2 = ((x[:, None, :] - cent[None, :, :]) ** 2).sum(-1)
    j = (diff2 / den(cent)[None]).argmin(axis=1)
    s = sc * np.sqrt(diff2[np.arange(len(x)), j] / (den(x) * den(cent)[j]))
    return j, 2 / sc * np.arcsinh(s)


@pytest.fixture(scope="module")
def four_blobs() -> tuple[np.ndarray, np.ndarray]:
    """Four tight clusters around (0.5 e_i), i < 4, in R^8, unit ball."""
    rng = np.random.default_rng(10)
    centres = np.eye(8)[:4] * 0.5
    return hyperbolic_blobs(rng, centres, 150, 0.3)


# ---------------------------------------------------------------------------------- cluster recovery


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("centroid", ["einstein", "frechet"])
def test_recovers_separated_clusters(c, centroid):
    rng = np.random.default_rng(1)
    # six clusters of hyperbolic radius 0.1 around 0.8..0.9 (+-e_i), centres >= 3.9 apart
    centres = np.concatenate([np.eye(8)[:3], -np.eye(8)[:3]]) * rng.uniform(0.8, 0.9, (6, 1))
    x, labels = hyperbolic_blobs(rng, centres, 200, 0.1, c)
    res = hyperbolic_kmeans(x, 6, c=c, seed=0, centroid=centroid, use_gpu=False)
    assert isinstance(res, KMeansResult)
    assert adjusted_rand_score(labels, res.assignment) >= 0.99
    assert res.converged and 1 <= res.iterations < 100
    _check_result(x, res, c)
    # every true centre has a centroid close to it (hyperbolic distance well under the spread)
    d = hyp.dist(centres[:, None, :] / math.sqrt(c), res.centroids[None], c)
    assert d.min(axis=1).max() < 0.05 / math.sqrt(c)


@pytest.mark.parametrize("c", CURVATURES)
def test_recovers_clusters_next_to_the_boundary(c):
    rng = np.random.default_rng(2)
    centres = unit_rows(rng, 8, 16) * rng.uniform(0.99, 0.999, (8, 1))
    x, labels = hyperbolic_blobs(rng, centres, 150, 0.3, c)
    assert (math.sqrt(c) * np.linalg.norm(x, axis=1)).min() > 0.98
    res = hyperbolic_kmeans(x, 8, c=c, seed=0, use_gpu=False)
    assert adjusted_rand_score(labels, res.assignment) >= 0.99
    _check_result(x, res, c)


def test_recovers_a_radial_hierarchy():
    """Clusters on one ray at depths d0 = 1, 3, 5, 7 (norms 0.46 .. 0.998), 2 apart hyperbolically, while the
    three outer centres are within 0.1 of each other in Euclidean terms."""
    rng = np.random.default_rng(3)
    depths = np.array([1.0, 3.0, 5.0, 7.0])
    e = unit_rows(rng, 1, 8)[0]
    centres = np.tanh(depths / 2)[:, None] * e
    x, labels = hyperbolic_blobs(rng, centres, 150, 0.15)
    res = hyperbolic_kmeans(x, 4, seed=0, use_gpu=False)
    assert adjusted_rand_score(labels, res.assignment) >= 0.99
    np.testing.assert_allclose(np.sort(hyp.dist0(res.centroids)), depths, atol=0.1)
    _check_result(x, res, 1.0)


def _check_result(x: np.ndarray, res: KMeansResult, c: float) -> None:
    """Assignment/distances are those of the returned centroids (float64 closed form); inertia their sum of
    squares; centroids inside the ball."""
    k = len(res.centroids)
    assert res.assignment.dtype == np.int32 and res.assignment.shape == (len(x),)
    assert res.distance.dtype == np.float64 and res.centroids.dtype == np.float64
    assert res.assignment.min() >= 0 and res.assignment.max() < k
    assert (math.sqrt(c) * np.linalg.norm(res.centroids, axis=1) < 1).all()
    ref, _ = brute_force(x, res.centroids, c)
    np.testing.assert_array_equal(res.assignment, ref)
    np.testing.assert_allclose(res.distance, hyp.dist(x, res.centroids[res.assignment], c), rtol=1e-7, atol=1e-12)
    assert res.inertia == pytest.approx(float(res.distance @ res.distance), rel=1e-12)


# ---------------------------------------------------------------------------------- faiss assignment


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("d", [2, 16, 64])
@pytest.mark.parametrize("centroid_kind", ["inside", "mixed", "points"])
def test_assign_equals_float64_brute_force(d, c, centroid_kind):
    rng = np.random.default_rng(d * 10 + int(4 * c))
    x = mixed_points(rng, 2000, d, c)
    if centroid_kind == "inside":
        cent = unit_rows(rng, 64, d) * rng.uniform(0, 0.95, (64, 1)) / math.sqrt(c)
    elif centroid_kind == "mixed":
        cent = mixed_points(rng, 64, d, c)
    else:  # centroids that are data points: zero distances, near-boundary centroids
        cent = x[rng.choice(len(x), 64, replace=False)]
    stats: dict = {}
    a, dist = assign(x, cent, c, use_gpu=False, stats=stats)
    ref_a, ref_d = brute_force(x, cent, c)
    ex_a, ex_d = assign_exact(x, cent, c)
    assert a.dtype == np.int32 and dist.dtype == np.float64
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(a, ex_a)
    np.testing.assert_array_equal(dist, ex_d)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-9, atol=1e-12)
    # torch's and numpy's norms differ by an ulp, i.e. ~1e-6 of a 1e-10 gap to the boundary
    np.testing.assert_allclose(dist, hyp.dist(x, cent[a], c), rtol=1e-7, atol=1e-12)
    assert not stats["gpu"] and stats["search"].startswith("float32/float64 GEMM on cpu")
    assert 0 <= stats["redone"] <= len(x) and 0 <= stats["fallback"] <= len(x)
    if centroid_kind == "inside":
        # certified by the float32 GEMM alone for most rows: the search, not the fallbacks, is exercised
        assert stats["redone"] + stats["fallback"] < len(x) // 10


@pytest.mark.parametrize("d", [2, 16, 64])
@pytest.mark.parametrize("candidates", [1, 2, 4, 8])
def test_assign_resolves_near_ties_float32_cannot_rank(d, candidates):
    """30 centroids within ~1e-9 of each other (float32 cannot order them) plus 30 spread ones: the faiss float32
    certificate must send the affected rows to float64 (which orders them), and the default engine agrees."""
    rng = np.random.default_rng(d + candidates)
    base = unit_rows(rng, 1, d) * 0.5
    cent = np.concatenate(
        [base + rng.normal(size=(30, d)) * 1e-9, unit_rows(rng, 30, d) * rng.uniform(0, 0.9, (30, 1))]
    )
    x = np.concatenate(
        [unit_rows(rng, 1500, d) * rng.uniform(0, 0.95, (1500, 1)), base + rng.normal(size=(500, d)) * 0.05]
    )
    stats: dict = {}
    a, dist = assign(x, cent, 1.0, candidates=candidates, stats=stats, engine=ke._Faiss(False, force_faiss_cpu=True))
    ref_a, _ = brute_force(x, cent, 1.0)
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(a, assign_exact(x, cent, 1.0)[0])
    assert stats["redone"] > 0 and stats["search"].endswith("float32 on cpu")
    np.testing.assert_array_equal(assign(x, cent, 1.0, use_gpu=False)[0], ref_a)


def test_assign_with_one_candidate_still_uses_the_faiss_path():
    rng = np.random.default_rng(11)
    x = unit_rows(rng, 2000, 16) * rng.uniform(0, 0.9, (2000, 1))
    cent = unit_rows(rng, 64, 16) * rng.uniform(0, 0.9, (64, 1))
    stats: dict = {}
    a, _ = assign(x, cent, candidates=1, stats=stats, engine=ke._Faiss(False, force_faiss_cpu=True))
    np.testing.assert_array_equal(a, brute_force(x, cent, 1.0)[0])
    assert stats["redone"] < len(x) // 10  # at least two candidates are searched, so the certificate works


def test_assigner_reused_across_centroid_sets():
    """`_Assigner` keeps the point side across Lloyd iterations; every call must equal the brute force."""
    rng = np.random.default_rng(7)
    c = 2.0
    x = mixed_points(rng, 1500, 16, c)
    assigner = ka._Assigner(kb.check_points(x, c), c, ke._Faiss(False), 4)
    for _ in range(3):
        cent = np.concatenate([mixed_points(rng, 20, 16, c), x[rng.choice(len(x), 20, replace=False)]])
        a, dist = assigner(cent)
        np.testing.assert_array_equal(a, brute_force(x, cent, c)[0])
        np.testing.assert_array_equal(dist, assign_exact(x, cent, c)[1])


@pytest.mark.parametrize("faiss_search", [False, True])
def test_assign_ties_go_to_the_lowest_index_and_candidates_beyond_k(faiss_search):
    """Ties to the lowest index; with faiss (the GPU's search, here on the CPU), more candidates than centroids."""
    x = np.array([[0.1, 0.0], [0.0, 0.0], [-0.3, 0.2]])
    cent = np.array([[0.5, 0.5], [0.0, 0.0], [0.0, 0.0], [-0.3, 0.2]])
    engine = ke._Faiss(False, force_faiss_cpu=faiss_search)
    for candidates in (10, 2):
        a, dist = assign(x, cent, candidates=candidates, engine=engine)
        np.testing.assert_array_equal(a, [1, 1, 3])
        np.testing.assert_array_equal(dist[1:], [0.0, 0.0])


def test_the_ball_check_uses_the_norm_of_d_x():
    """Points on the unit sphere (to rounding): accepted exactly when the norm D(x) is computed from is below 1."""
    rng = np.random.default_rng(9)
    for d in (16, 256):
        v = rng.normal(size=(3000, d))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        inside = np.linalg.norm(v, axis=1) < 1
        assert 0 < inside.sum() < len(v)
        np.testing.assert_array_equal(assign(v[inside], v[:1] * 0.5)[0], np.zeros(inside.sum()))
        for row in np.flatnonzero(~inside)[:20]:
            with pytest.raises(PipelineError, match="outside the Poincaré ball"):
                assign(v[row : row + 1], v[:1] * 0.5)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="a GPU is visible to faiss")
def test_use_gpu_true_without_gpu_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="GPU"):
        assign(np.zeros((3, 2)), np.zeros((1, 2)), use_gpu=True)


# ----------------------------------------------------------------------------------------- behaviour


def test_seeded_runs_are_deterministic(four_blobs):
    x, _ = four_blobs
    a = hyperbolic_kmeans(x, 5, seed=3, use_gpu=False)
    b = hyperbolic_kmeans(x, 5, seed=3, use_gpu=False)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.distance, b.distance)
    assert (a.inertia, a.iterations, a.converged) == (b.inertia, b.iterations, b.converged)
    e1 = euclidean_kmeans(x, 5, seed=3, use_gpu=False)
    e2 = euclidean_kmeans(x, 5, seed=3, use_gpu=False)
    np.testing.assert_array_equal(e1.assignment, e2.assignment)
    np.testing.assert_array_equal(e1.centroids, e2.centroids)


def test_init_size_subsample_and_max_iter_zero(four_blobs):
    x, labels = four_blobs
    res = hyperbolic_kmeans(x, 4, seed=0, init_size=40, use_gpu=False)
    assert adjusted_rand_score(labels, res.assignment) >= 0.99
    zero = hyperbolic_kmeans(x, 4, seed=0, max_iter=0, use_gpu=False)
    assert zero.iterations == 0 and not zero.converged
    _check_result(x, zero, 1.0)


def test_k_equal_to_n_and_k_one():
    rng = np.random.default_rng(8)
    x = unit_rows(rng, 12, 3) * rng.uniform(0, 0.99, (12, 1))
    res = hyperbolic_kmeans(x, 12, use_gpu=False)
    assert sorted(res.assignment.tolist()) == list(range(12))
    assert res.inertia == pytest.approx(0.0, abs=1e-20)
    one = hyperbolic_kmeans(x, 1, use_gpu=False)
    assert (one.assignment == 0).all()
    np.testing.assert_allclose(one.centroids[0], hyp.einstein_midpoint(x), rtol=1e-9, atol=1e-12)
    _check_result(x, one, 1.0)


def test_reseed_empty_moves_the_farthest_points():
    assignment = np.array([0, 0, 0, 2, 2, 2], dtype=np.int32)
    distance = np.array([0.1, 0.9, 0.3, 0.5, 0.2, 0.8])
    assert km._reseed_empty(assignment, distance, 4) == 2
    # farthest point (1, from cluster 0) fills cluster 1, the next (5, from cluster 2) fills cluster 3
    np.testing.assert_array_equal(assignment, [0, 1, 0, 2, 2, 3])
    np.testing.assert_array_equal(distance, [0.1, 0.0, 0.3, 0.5, 0.2, 0.0])
    assert km._reseed_empty(assignment, distance, 4) == 0


def test_reseed_empty_never_empties_a_singleton():
    assignment = np.array([0, 1, 1, 1], dtype=np.int32)
    distance = np.array([5.0, 0.1, 0.2, 0.3])
    assert km._reseed_empty(assignment, distance, 3) == 1
    np.testing.assert_array_equal(assignment, [0, 1, 1, 2])


def test_empty_clusters_are_reseeded_during_lloyd(monkeypatch, caplog, four_blobs):
    x, labels = four_blobs
    real_pp = km._kmeans_pp

    def bad_seeds(xs, den, k, c, rng):
        # two seeds far from every point: their clusters are empty after the first assignment
        seeds = real_pp(xs, den, k - 2, c, rng)
        far = np.eye(8)[[5, 6]] * 0.9999
        return np.concatenate([seeds, far])

    monkeypatch.setattr(km, "_kmeans_pp", bad_seeds)
    first = {}
    real_reseed = km._reseed_empty

    def spy(assignment, distance, k):
        n = real_reseed(assignment, distance, k)
        first.setdefault("reseeded", n)
        return n

    monkeypatch.setattr(km, "_reseed_empty", spy)
    with caplog.at_level(logging.DEBUG, logger="pipeline.geometry.kmeans"):
        res = hyperbolic_kmeans(x, 6, seed=0, use_gpu=False)
    assert first["reseeded"] == 2
    assert "re-seeded 2 empty clusters" in caplog.text
    assert np.bincount(res.assignment, minlength=6).min() >= 1
    assert (np.linalg.norm(res.centroids, axis=1) < 0.99).all()  # no centroid left at the far seeds
    _check_result(x, res, 1.0)


def test_duplicate_points_with_more_clusters_than_distinct_values():
    x = np.repeat(np.array([[0.1, 0.2], [-0.5, 0.3], [0.0, -0.7]]), 4, axis=0)
    res = hyperbolic_kmeans(x, 5, seed=0, max_iter=10, use_gpu=False)
    assert res.inertia == pytest.approx(0.0, abs=1e-20)
    assert np.isfinite(res.centroids).all()
    _check_result(x, res, 1.0)


def test_progress_logs_iterations_at_info(caplog, four_blobs):
    x, _ = four_blobs
    with caplog.at_level(logging.INFO, logger="pipeline.geometry.kmeans"):
        hyperbolic_kmeans(x, 4, seed=0, progress=True, use_gpu=False)
    assert "iteration 1:" in caplog.text


# -------------------------------------------------------------------------------------------- Euclidean


def gaussian_blobs(seed: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Five Gaussian blobs (std 0.5) around N(0, 10^2) centres in R^8: trivially separated."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 8)) * 10
    labels = np.repeat(np.arange(5), 200)
    return centres[labels] + rng.normal(size=(1000, 8)) * 0.5, labels


def test_euclidean_kmeans_result_contract():
    x, _ = gaussian_blobs()
    res = euclidean_kmeans(x, 5, seed=0, use_gpu=False)
    assert isinstance(res, KMeansResult)
    assert res.assignment.dtype == np.int32 and res.assignment.shape == (1000,)
    assert res.centroids.dtype == np.float64 and res.centroids.shape == (5, 8)
    np.testing.assert_allclose(res.distance, np.linalg.norm(x - res.centroids[res.assignment], axis=1), rtol=1e-12)
    assert res.inertia == pytest.approx(float(res.distance @ res.distance), rel=1e-12)
    assert 1 <= res.iterations <= 100
    assert isinstance(res.converged, bool)
    # nearest centroid (the certified float64 assignment; tests/geometry/test_kmeans_streaming.py tests near-ties)
    d = np.linalg.norm(x[:, None] - res.centroids[None], axis=2)
    np.testing.assert_array_equal(res.assignment, d.argmin(axis=1))
    # each centroid is the mean of its points (Lloyd's fixed point)
    for j in np.unique(res.assignment):
        np.testing.assert_allclose(res.centroids[j], x[res.assignment == j].mean(axis=0), rtol=1e-4, atol=1e-4)
    # points need not lie in any ball
    assert np.linalg.norm(x, axis=1).max() > 1
    assert euclidean_kmeans(x, 5, seed=0, max_iter=3, use_gpu=False).iterations <= 3


def test_euclidean_kmeans_recovers_clusters_when_seeded_well():
    x, labels = gaussian_blobs()
    res = euclidean_kmeans(x, 5, seed=2, use_gpu=False)
    assert adjusted_rand_score(labels, res.assignment) >= 0.99


def test_euclidean_kmeans_recovers_gaussian_blobs_for_any_seed():
    x, labels = gaussian_blobs()
    for seed in range(5):
        res = euclidean_kmeans(x, 5, seed=seed, use_gpu=False)
        assert adjusted_rand_score(labels, res.assignment) >= 0.99, seed


# ------------------------------------------------------------------------------------------------ errors


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("fn", [hyperbolic_kmeans, euclidean_kmeans])
def test_k_larger_than_the_number_of_points(fn):
    x = np.zeros((5, 3)) + np.arange(5)[:, None] * 0.1
    with pytest.raises(PipelineError, match=r"k = 6 is larger than the number of points \(5\)") as e:
        fn(x, 6)
    _one_line(e)
    for bad in (0, -1, 2.5):
        with pytest.raises(PipelineError, match="k must be a positive integer"):
            fn(x, bad)


@pytest.mark.parametrize("fn", [hyperbolic_kmeans, euclidean_kmeans])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_embeddings(fn, value):
    x = np.full((10, 3), 0.1)
    x[7, 1] = value
    with pytest.raises(PipelineError, match=r"1 embeddings contain NaN or inf \(first at index 7\)") as e:
        fn(x, 2)
    _one_line(e)


@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("scaled_norm", [1.0, 1.0 + 1e-12, 1.5])
def test_points_on_or_outside_the_ball(c, scaled_norm):
    x = np.full((10, 3), 0.01)
    x[3] = np.array([0.6, 0.8, 0.0]) * scaled_norm / math.sqrt(c)
    with pytest.raises(PipelineError, match=r"1 embeddings lie on or outside the Poincaré ball.*first at index 3") as e:
        hyperbolic_kmeans(x, 2, c=c)
    _one_line(e)
    with pytest.raises(PipelineError, match="outside the Poincaré ball"):
        assign(x, x[:2], c)
    with pytest.raises(PipelineError, match="outside the Poincaré ball"):
        assign(x[4:], x[2:4], c)


def test_huge_finite_embeddings_are_outside_the_ball_not_nan():
    """A finite row whose squared norm overflows is outside the ball; NaN/inf are reported first."""
    x = np.full((10, 3), 0.01)
    x[5] = [1e200, 0.0, -1e200]
    with pytest.raises(PipelineError, match=r"1 embeddings lie on or outside the Poincaré ball.*first at index 5"):
        assign(x, x[:2])
    x[2, 0] = np.inf
    with pytest.raises(PipelineError, match=r"1 embeddings contain NaN or inf \(first at index 2\)"):
        assign(x, x[:2])


def test_point_valid_for_one_curvature_is_outside_for_a_larger_one():
    x = np.array([[0.8, 0.0], [0.0, 0.1], [0.1, 0.1]])
    assert hyperbolic_kmeans(x, 2, c=1.0).assignment.shape == (3,)
    with pytest.raises(PipelineError, match="first at index 0"):
        hyperbolic_kmeans(x, 2, c=2.0)


def test_other_bad_inputs():
    x = np.full((10, 3), 0.1)
    with pytest.raises(PipelineError, match=r"numeric \(N, d\) array"):
        hyperbolic_kmeans(np.zeros(10), 2)
    with pytest.raises(PipelineError, match=r"numeric \(N, d\) array"):
        hyperbolic_kmeans(np.zeros((10, 0)), 2)
    with pytest.raises(PipelineError, match="centroid must be"):
        hyperbolic_kmeans(x, 2, centroid="mean")
    with pytest.raises(PipelineError, match="curvature c must be a positive number"):
        hyperbolic_kmeans(x, 2, c=0.0)
    with pytest.raises(PipelineError, match="max_iter"):
        hyperbolic_kmeans(x, 2, max_iter=-1)
    with pytest.raises(PipelineError, match="dimension"):
        assign(x, np.zeros((2, 4)))
    with pytest.raises(PipelineError, match="geometry"):
        inertia_curve(x, [1, 2], geometry="spherical")


def test_float32_and_list_inputs_give_numpy_results(four_blobs):
    x, labels = four_blobs
    res = hyperbolic_kmeans(x.astype(np.float32), 4, seed=0, use_gpu=False)
    assert adjusted_rand_score(labels, res.assignment) >= 0.99
    res_list = hyperbolic_kmeans(x[:20].tolist(), 2, seed=0, use_gpu=False)
    assert res_list.assignment.shape == (20,)
    assert not isinstance(res.centroids, torch.Tensor)


# --------------------------------------------------------------------------------------------- choosing k


def test_knee_picks_the_obvious_elbow():
    ks = list(range(1, 11))
    assert knee(ks, [100, 70, 40, 10, 9, 8, 7, 6, 5, 4]) == 4
    assert knee(ks, [1000, 400, 120, 100, 90, 82, 76, 71, 67, 64]) == 3
    # order of the pairs does not matter
    perm = np.random.default_rng(0).permutation(10)
    assert knee(np.array(ks)[perm], np.array([100, 70, 40, 10, 9, 8, 7, 6, 5, 4])[perm]) == 4
    # uneven k grid
    assert knee([2, 4, 8, 16, 32, 64], [500, 300, 100, 90, 85, 82]) == 8
    # flat curve: ties go to the smallest k
    assert knee([1, 2, 3], [5.0, 5.0, 5.0]) == 1


def test_knee_bad_inputs():
    with pytest.raises(PipelineError, match="at least 3"):
        knee([1, 2], [3.0, 1.0])
    with pytest.raises(PipelineError, match="at least 3"):
        knee([1, 2, 3], [3.0, 1.0])
    with pytest.raises(PipelineError, match="finite"):
        knee([1, 2, 3], [3.0, np.nan, 1.0])


@pytest.mark.parametrize("geometry", ["poincare", "euclidean"])
def test_inertia_curve_decreases_and_its_knee_is_the_true_k(geometry, four_blobs):
    x, _ = four_blobs
    ks = list(range(1, 9))
    curve = inertia_curve(x, ks, geometry=geometry, seed=0, use_gpu=False)
    assert [k for k, _ in curve] == ks
    inertias = np.array([v for _, v in curve])
    assert np.all(np.diff(inertias) <= 0.02 * inertias[:-1])  # monotone up to k-means' local optima
    assert inertias[3] < 0.1 * inertias[0]
    assert knee(ks, inertias) == 4
