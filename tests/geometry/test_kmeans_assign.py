"""The certified nearest-centroid assignment (kmeans_assign): property tests against the float64 closed
form on every engine (the CPU's GEMMs, faiss float32 as it runs on GPUs, torch's float64) with points and centroids
next to the boundary, exact duplicates and near-ties at every scale from 1e-3 down to below float64's resolution
(one tile's certificate and fallbacks: test_kmeans_tiles); independence of threads and blocks; the GPU path (faiss
replicas over every visible GPU, the rank's own GPU under torchrun) with faiss' GPU calls stubbed."""

from __future__ import annotations

import math
import types
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.distributed import Ranks
from pipeline.errors import PipelineError
from pipeline.geometry import kmeans_assign as ka
from pipeline.geometry import kmeans_engines as ke
from pipeline.geometry import kmeans_fused
from pipeline.geometry import kmeans_terms as kt
from pipeline.geometry import kmeans_tiles as ktiles
from pipeline.geometry.kmeans import assign, assign_exact
from tests.geometry.test_kmeans import mixed_points, unit_rows

ENGINES = {
    "cpu": lambda: ke._Faiss(False),  # the fused kernel's float32 then float64 top-2, then near-ties (or numpy's)
    "cpu-numpy": lambda: ke._Faiss(False, fused=False),  # the same through numpy's GEMM (no fused kernel)
    "faiss32": lambda: ke._Faiss(False, force_faiss_cpu=True),  # faiss float32 top-k (the GPU path), then float64
    "torch64": lambda: ke._Faiss(False, force_torch="cpu"),  # torch's float64 GEMM + top-2 (its GPU path), on the CPU
}
if torch.cuda.is_available():  # the same path on the GPU itself (benchmarks/gpu_check.sh runs these tests there)
    ENGINES["torch64cuda"] = lambda: ke._Faiss(False, force_torch="cuda")


def closed_form(x: np.ndarray, cent: np.ndarray, c: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by the closed form over every pair, float64: the Poincaré distance ``arcosh(1 + 2c|x-y|^2 /
    ((1 - c|x|^2)(1 - c|y|^2))) / sqrt(c)`` (c None: the squared Euclidean distance); also whether each row's
    winner is *decided* in float64: its value below the runner-up's by more than a relative 1e-11 (the float64
    rounding of any form of the closed form is far below; closer rows are ties within rounding)."""
    if c is None:
        value = ((x[:, None, :] - cent[None, :, :]) ** 2).sum(-1)
    else:  # |x-m|^2 / D(m): the same ranking as arcosh, without arcosh's cancellation at 1
        sc = math.sqrt(c)

        def den(p):
            r = sc * np.linalg.norm(p, axis=1)
            return (1 - r) * (1 + r)

        value = ((x[:, None, :] - cent[None, :, :]) ** 2).sum(-1) / den(cent)[None]
    j = value.argmin(axis=1)
    if cent.shape[0] == 1:
        return j, np.ones(len(x), dtype=bool)
    part = np.sort(value, axis=1)
    decided = part[:, 1] > part[:, 0] * (1 + 1e-11) + 1e-300
    return j, decided


def near_ties(rng: np.random.Generator, base: np.ndarray, n: int, scale: float, c: float | None) -> np.ndarray:
    """``n`` copies of rows of ``base`` moved by a relative ``scale`` (0: exact duplicates), kept inside the ball."""
    rows = base[rng.integers(0, len(base), n)]
    moved = rows + rng.normal(size=rows.shape) * scale * np.maximum(np.abs(rows), 1e-300)
    if c is not None:  # back inside the ball, at the gap the row had
        r_old = math.sqrt(c) * np.linalg.norm(rows, axis=1)
        r_new = math.sqrt(c) * np.linalg.norm(moved, axis=1)
        over = r_new >= 1
        moved[over] *= (r_old[over] / r_new[over])[:, None]
    return moved


@st.composite
def problems(draw):
    """(x, centroids, c or None, engine name, candidates): mixed radii with gaps down to 1e-10 from the boundary,
    centroids drawn among the points, fresh and near-ties of the other centroids at a drawn scale."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    d = draw(st.sampled_from([1, 2, 3, 8, 16, 33]))
    geometry = draw(st.sampled_from(["poincare", "euclidean"]))
    c = draw(st.sampled_from([0.5, 1.0, 2.0])) if geometry == "poincare" else None
    n = draw(st.integers(1, 300))
    x = mixed_points(rng, n, d, c or 1.0)
    k0 = draw(st.integers(1, 30))
    kind = draw(st.sampled_from(["points", "fresh", "both"]))
    picked = x[rng.integers(0, n, k0)]
    fresh = mixed_points(rng, k0, d, c or 1.0)
    cent = {"points": picked, "fresh": fresh, "both": np.concatenate([picked, fresh])}[kind]
    scale = draw(st.sampled_from([0.0, 1e-16, 1e-14, 1e-12, 1e-9, 1e-6, 1e-3]))
    n_ties = draw(st.integers(0, 10))
    if n_ties:
        cent = np.concatenate([cent, near_ties(rng, cent, n_ties, scale, c)])
        if draw(st.booleans()):  # and points that sit at the tied centroids
            x = np.concatenate([x, near_ties(rng, cent[-n_ties:], n_ties, scale, c)])
    cent = cent[rng.permutation(len(cent))]
    if geometry == "euclidean":
        offset = draw(st.sampled_from([0.0, 1.0, 1e3]))
        x, cent = x * 10 + offset, cent * 10 + offset
    return x, cent, c, draw(st.sampled_from(sorted(ENGINES))), draw(st.sampled_from([1, 2, 4]))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_assignment_equals_the_float64_closed_form(problem):
    """Identical to `assign_exact` (assignment and distance, bit for bit) on every row, and to the closed form on
    every row float64 decides; the engine only changes how many rows needed float64 or the brute force."""
    x, cent, c, engine, candidates = problem
    geometry = "euclidean" if c is None else "poincare"
    stats: dict = {}
    a, dist = assign(x, cent, c or 1.0, candidates, geometry=geometry, stats=stats, engine=ENGINES[engine]())
    ex_a, ex_d = assign_exact(x, cent, c or 1.0, geometry=geometry)
    np.testing.assert_array_equal(a, ex_a)
    np.testing.assert_array_equal(dist, ex_d)
    ref, decided = closed_form(x, cent, c)
    np.testing.assert_array_equal(a[decided], ref[decided])
    assert 0 <= stats["redone"] <= len(x) and 0 <= stats["fallback"] <= len(x)


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("d", [2, 16, 64])
def test_near_boundary_near_ties_at_every_scale(engine, d):
    """Clusters at gaps 1e-3 .. 1e-8 from the boundary, several centroids per cluster moved by relative 1e-2 ..
    1e-13, points around them: what the GEMM's bound leaves open is decided by the reference value over the
    centroids under the row's ceiling (the near-ties)."""
    rng = np.random.default_rng(d)
    gaps = 10.0 ** -rng.uniform(3, 8, 12)
    centres = unit_rows(rng, 12, d) * (1 - gaps)[:, None]
    cent = np.concatenate([centres] + [near_ties(rng, centres, 12, s, 1.0) for s in (1e-2, 1e-5, 1e-9, 1e-13)])
    x = np.concatenate([near_ties(rng, centres, 1500, 10.0**-p, 1.0) for p in (3, 6, 9)])
    stats: dict = {}
    a, dist = assign(x, cent, stats=stats, engine=ENGINES[engine]())
    ex_a, ex_d = assign_exact(x, cent)
    np.testing.assert_array_equal(a, ex_a)
    np.testing.assert_array_equal(dist, ex_d)
    ref, decided = closed_form(x, cent, 1.0)
    np.testing.assert_array_equal(a[decided], ref[decided])
    assert decided.mean() > 0.5
    assert stats["fallback"] > 0  # the 1e-13 ties, and rows at gaps ~1e-8 where t's differences are ~1e-11
    if engine == "faiss32":
        assert stats["redone"] > len(x) // 4  # float32 cannot order centroids this close to the boundary
    if engine == "cpu" and ENGINES[engine]().fused and d + 2 <= kmeans_fused.MAX_TERMS:
        assert stats["redone"] > 0  # every row float32 leaves open goes through the float64 kernel


def test_result_does_not_depend_on_threads_or_blocks(monkeypatch):
    rng = np.random.default_rng(4)
    x = mixed_points(rng, 5000, 16, 1.0)
    cent = np.concatenate([x[:100], near_ties(rng, x[:100], 50, 1e-12, 1.0)])
    runs = []
    default = ktiles._TILE
    for workers, rows, tile in [(1, None, default), (2, 777, default), (3, 1000, 3000), (2, None, default)]:
        monkeypatch.setattr(ke, "threads", lambda w=workers: w)
        monkeypatch.setattr(ktiles, "_TILE", tile)
        monkeypatch.setattr(ka, "_FUSED_ROWS", min(tile // 10, 4096))
        runs.append(assign(x, cent, use_gpu=False, block_rows=rows))
    for a, dist in runs[1:]:
        np.testing.assert_array_equal(a, runs[0][0])
        np.testing.assert_array_equal(dist, runs[0][1])


@pytest.mark.parametrize("n, rows, workers", [(50_000, 4096, 2), (3392, 4096, 2), (100, 4096, 3), (7, 4096, 1)])
def test_tiles_are_as_many_on_every_worker(n, rows, workers):
    """A block's tiles: at most ``rows`` rows each, every row once, their count a multiple of the workers (none
    idle while another runs the last tile), as long as there are rows enough."""
    tiles = list(ka.blocks(n, ka._balanced(n, rows, workers)))
    assert sum(t.stop - t.start for t in tiles) == n and all(t.stop - t.start <= rows for t in tiles)
    assert len(tiles) % workers == 0 or len(tiles) == n


def test_the_next_blocks_tiles_are_queued_before_a_block_is_collected(monkeypatch):
    """The CPU search queues block i + 1's tiles on the workers before it collects block i's, so that no worker
    waits between blocks; the result is that of one block."""
    rng = np.random.default_rng(8)
    x = mixed_points(rng, 5000, 16, 1.0)
    cent = np.concatenate([x[:60], near_ties(rng, x[:60], 30, 1e-9, 1.0)])
    monkeypatch.setattr(ke, "threads", lambda: 2)
    monkeypatch.setattr(ka, "_FUSED_ROWS", 300)
    events = []
    for name in ("_start", "_collect"):
        method = getattr(ka._Assigner, name)
        monkeypatch.setattr(ka._Assigner, name, lambda *a, m=method, n=name: events.append(n) or m(*a))
    a, dist = assign(x, cent, use_gpu=False, block_rows=1000)
    assert events == ["_start"] + ["_start", "_collect"] * 4 + ["_collect"]
    monkeypatch.undo()
    np.testing.assert_array_equal(a, assign_exact(x, cent)[0])
    np.testing.assert_array_equal(dist, assign_exact(x, cent)[1])


def test_the_rows_terms_are_split_over_the_workers(monkeypatch):
    """A 5,000-row block on 2 workers: D(x) in two shares (`_Assigner._rows`), the same bits as in one call."""
    rng = np.random.default_rng(6)
    x = mixed_points(rng, 5000, 8, 1.0)
    monkeypatch.setattr(ke, "threads", lambda: 2)
    assigner = ka._Assigner(x, 1.0, ke._Faiss(False), 4)
    with ThreadPoolExecutor(2) as pool:
        calls = []
        rows = assigner.geom.rows
        monkeypatch.setattr(assigner.geom, "rows", lambda xb: calls.append(len(xb)) or rows(xb))
        split = assigner._rows(pool, x)
    assert sorted(calls) == [904, 4096]
    np.testing.assert_array_equal(split[0], kt.Poincare(1.0).rows(x)[0])


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize(
    "geometry, c, scale",
    [("euclidean", 1.0, s) for s in (1e16, 1e19, 1e40, 1e150, 1e160)] + [("poincare", 1e-40, 1e19)],
)
def test_coordinates_that_overflow_the_gemm(engine, geometry, c, scale):
    """Coordinates whose GEMM would overflow float32 (beyond ~1e15) or float64 (~1e150) go one precision further,
    the last to direct differences: still the reference assignment, never a centroid certified from inf or NaN."""
    rng = np.random.default_rng(int(math.log10(scale)))
    x, cent = rng.normal(size=(300, 4)) * scale, rng.normal(size=(10, 4)) * scale
    if geometry == "poincare":  # a ball of radius 1e20
        x, cent = x[np.linalg.norm(x, axis=1) < 5e19], cent[np.linalg.norm(cent, axis=1) < 5e19]
    with np.errstate(over="ignore"):  # beyond ~1e154 the reference's own squares overflow
        a, dist = assign(x, cent, c, geometry=geometry, candidates=2, engine=ENGINES[engine]())
        ref_a, ref_dist = assign_exact(x, cent, c, geometry=geometry)
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(dist, ref_dist)


@pytest.mark.parametrize("engine", ["cpu", "cpu-numpy"])
def test_rows_that_fit_and_rows_that_overflow_in_one_tile(engine):
    """A tile mixing ordinary rows with rows beyond float32's range: those go to float64 (`_split`), the others
    through the usual float32 pass (the fused kernel's, for "cpu"), merged in row order."""
    rng = np.random.default_rng(3)
    scale = np.where(rng.random(400) < 0.3, 1e17, 1.0)[:, None]
    x, cent = rng.normal(size=(400, 6)) * scale, rng.normal(size=(12, 6))  # the centroids' spread fits float32
    stats: dict = {}
    a, dist = assign(x, cent, geometry="euclidean", stats=stats, engine=ENGINES[engine]())
    ref_a, ref_dist = assign_exact(x, cent, geometry="euclidean")
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(dist, ref_dist)
    assert 0 < stats["redone"] < len(x)


def test_one_centroid_and_wide_rows():
    rng = np.random.default_rng(5)
    x = mixed_points(rng, 50, 300, 1.0)
    for cent in (x[:1], x[:3]):
        np.testing.assert_array_equal(assign(x, cent, use_gpu=False)[1], assign_exact(x, cent)[1])


# -------------------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def two_gpus(monkeypatch):
    """faiss "sees" two GPUs: GPU resources and cloners are stubs that keep the CPU index and record the calls."""
    calls: list = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", types.SimpleNamespace, raising=False)

    def multiple(resources, index, options, gpus):
        calls.append(("replicas", len(resources), list(gpus), options.shard))
        return index

    def single(resource, gpu, index):
        calls.append(("one", gpu))
        return index

    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", multiple, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", single, raising=False)
    monkeypatch.setattr(ke, "_RESOURCES", {})
    return calls


def test_gpu_search_is_replicated_over_every_visible_gpu(two_gpus):
    rng = np.random.default_rng(6)
    x = mixed_points(rng, 2000, 16, 1.0)
    cent = x[rng.choice(2000, 50, replace=False)]
    stats: dict = {}
    a, dist = assign(x, cent, stats=stats)
    assert two_gpus == [("replicas", 2, [0, 1], False)]
    assert stats["gpu"] and "float32 on GPU [0, 1]" in stats["search"]
    np.testing.assert_array_equal(a, assign_exact(x, cent)[0])
    np.testing.assert_array_equal(dist, assign_exact(x, cent)[1])
    assign(x, cent, use_gpu=False, stats=stats)
    assert not stats["gpu"] and len(two_gpus) == 1
    assign(x, cent, stats=stats, engine=ke._Faiss(None, [1]))  # a torchrun rank's own GPU
    assert two_gpus[-1] == ("one", 1) and "GPU [1]" in stats["search"]
    with pytest.raises(PipelineError, match="not among the 2 GPUs"):
        ke._Faiss(None, [2])


def test_torchrun_ranks_take_their_own_gpu(two_gpus):
    from stages.cluster import rank_gpus

    assert rank_gpus(Ranks(0, 1, 0)) is None  # one process: every GPU
    assert rank_gpus(Ranks(3, 4, 1)) == [1]
    assert rank_gpus(Ranks(2, 4, 2)) == [0]


@pytest.mark.skipif(faiss.get_num_gpus() > 0 or ke.cuda_devices() > 0, reason="a GPU is visible")
def test_without_gpu_the_search_is_the_cpu_gemm():
    assert ke.search_name().startswith("float32/float64 GEMM on cpu")
    assert ke.faiss_backend() == f"faiss {faiss.__version__} on cpu"
    assert ke._Faiss(None).torch_device is None
    with pytest.raises(PipelineError, match="neither faiss nor torch sees a GPU"):
        ke._Faiss(True)


@pytest.fixture
def torch_sees_two_gpus(monkeypatch):
    """torch "sees" two CUDA GPUs, faiss none (faiss-cpu): the engine is chosen, never run."""
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    import stages.cluster

    monkeypatch.setattr(ke, "cuda_devices", lambda: 2)
    monkeypatch.setattr(stages.cluster, "cuda_devices", lambda: 2)
    monkeypatch.setattr(ke.torch.cuda, "current_device", lambda: 0)


def test_a_gpu_only_torch_sees_runs_the_torch_float64_search(torch_sees_two_gpus):
    from stages.cluster import rank_gpus

    engine = ke._Faiss(None)
    assert engine.torch_device == ke.torch.device("cuda", 0) and not engine.faiss
    assert engine.name == ke.search_name() and "torch float64 GEMM on cuda:0" in engine.name
    assert ke._Faiss(True).torch_device == ke.torch.device("cuda", 0)  # use_gpu=True: a GPU is there
    assert ke._Faiss(None, [1]).torch_device == ke.torch.device("cuda", 1)  # a torchrun rank's own GPU
    assert ke._Faiss(False).torch_device is None and ke._Faiss(False).name.startswith("float32/float64 GEMM on cpu")
    with pytest.raises(PipelineError, match="not among the 2 GPUs torch sees"):
        ke._Faiss(None, [2])
    assert rank_gpus(Ranks(3, 4, 1)) == [1]


@pytest.mark.parametrize("geometry", ["poincare", "euclidean"])
def test_the_torch_search_certifies_like_the_others(geometry):
    """torch's float64 top-2 (run here on the CPU, as on a GPU) gives the reference assignment and distances, the
    exact duplicates among the centroids going to the CPU's near-tie path."""
    rng = np.random.default_rng(8)
    x = mixed_points(rng, 3000, 16, 1.0)
    chosen = x[rng.choice(3000, 60, replace=False)]
    cent = np.concatenate([chosen, chosen[:5]])  # five centroids twice: exact ties
    stats: dict = {}
    a, dist = assign(x, cent, geometry=geometry, stats=stats, engine=ke._Faiss(False, force_torch="cpu"))
    ref_a, ref_dist = assign_exact(x, cent, geometry=geometry)
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(dist, ref_dist)
    assert "torch float64 GEMM on cpu" in stats["search"] and not stats["gpu"]
    assert stats["redone"] >= 5  # at least the rows whose own centroid is duplicated


def test_the_cpu_search_needs_no_faiss(monkeypatch):
    """Installed without the cpu / gpu extra (no faiss module): the CPU's GEMM still assigns, and says so."""
    monkeypatch.setattr(ke, "faiss", None)
    rng = np.random.default_rng(7)
    x = mixed_points(rng, 500, 8, 1.0)
    stats: dict = {}
    a, dist = assign(x, x[:20], stats=stats)
    np.testing.assert_array_equal(a, assign_exact(x, x[:20])[0])
    assert "no faiss" in stats["search"] and ke.faiss_backend() == "no faiss on cpu"
    with pytest.raises(PipelineError, match="needs faiss"):
        ke._Faiss(False, force_faiss_cpu=True)
