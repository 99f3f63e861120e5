"""Streamed k-means (kmeans_update, kmeans_blocks, kmeans_assign): the block-wise
centroid updates against the one-shot closed forms of hyperbolic, zarr or block-read input against numpy
input (bit-identical, blocks smaller than N), block sizes, checks across blocks, the farthest-first re-seeding walk;
the Euclidean assignment against a float64 brute force and the one Lloyd loop both geometries share."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.errors import PipelineError
from pipeline.geometry import hyperbolic as hyp
from pipeline.geometry import kmeans as km
from pipeline.geometry import kmeans_blocks as kb
from pipeline.geometry import kmeans_engines as ke
from pipeline.geometry import kmeans_update as ku
from pipeline.geometry.kmeans import assign, assign_exact, euclidean_kmeans, hyperbolic_kmeans, kmeans
from tests.geometry.test_kmeans import CURVATURES, gaussian_blobs, hyperbolic_blobs, mixed_points, unit_rows

# ---------------------------------------------------------------------------------------------- streaming


class RowReader:
    """An (N, d) array that can only be read by row slices (no ``len``, as a zarr array); records every read."""

    def __init__(self, x: np.ndarray) -> None:
        self._x, self.shape, self.dtype = x, x.shape, x.dtype
        self.reads: list[int] = []

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step in (None, 1), key
        self.reads.append(len(range(*key.indices(self.shape[0]))))
        return self._x[key].copy()


def zarr_array(path, x: np.ndarray, chunk: int):
    z = zarr.create_array(store=str(path), shape=x.shape, dtype=x.dtype, chunks=(chunk, x.shape[1]))
    z[:] = x
    return zarr.open_array(str(path), mode="r")


def blocks_of(x: np.ndarray, groups: np.ndarray, rows: int = 97):
    def read():
        for i in range(0, len(x), rows):
            yield x[i : i + rows], groups[i : i + rows]

    return read


@pytest.mark.parametrize("c", CURVATURES)
def test_streamed_einstein_midpoint_equals_the_closed_form(c):
    rng = np.random.default_rng(20)
    x = mixed_points(rng, 1000, 8, c)  # next to the boundary too
    groups = rng.choice([0, 1, 2, 3, 4, 6], size=len(x))  # groups 5 and 7 empty
    streamed = ku.einstein_midpoint_blocks(blocks_of(x, groups), 8, c).numpy()
    whole = hyp.einstein_midpoint(x, c=c, groups=groups, n_groups=8)
    assert np.isnan(streamed[[5, 7]]).all() and np.isfinite(streamed[[0, 1, 2, 3, 4, 6]]).all()
    np.testing.assert_allclose(streamed, whole, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("c", CURVATURES)
def test_streamed_frechet_mean_equals_the_karcher_iteration(c):
    rng = np.random.default_rng(21)
    centres = unit_rows(rng, 5, 8) * rng.uniform(0.2, 0.95, (5, 1))
    x, _ = hyperbolic_blobs(rng, centres, 120, 1.0, c)
    groups = rng.integers(0, 6, len(x))  # groups mix blobs: spread-out sets, several Karcher steps
    streamed = ku.frechet_mean_blocks(blocks_of(x, groups), 7, c).numpy()
    whole = hyp.frechet_mean(x, c=c, groups=groups, n_groups=7)
    assert np.isnan(streamed[6]).all()
    np.testing.assert_allclose(streamed, whole, rtol=1e-12, atol=1e-15, equal_nan=True)


def test_streamed_mean_and_update_do_not_depend_on_the_block_size():
    rng = np.random.default_rng(22)
    x = mixed_points(rng, 1000, 8, 1.0)
    a = rng.integers(0, 5, len(x)).astype(np.int32)  # cluster 5 empty: keeps its old centroid
    old = np.arange(48, dtype=np.float64).reshape(6, 8) / 100
    mean = ku.mean_blocks(blocks_of(x, a), 5)
    for j in range(5):
        np.testing.assert_allclose(mean[j], x[a == j].mean(axis=0), rtol=1e-12, atol=1e-15)
    for rule in ("einstein", "frechet", "mean"):
        whole = km._update(x, a, 6, 1.0, rule, old)
        for rows in (97, 1, 999):
            np.testing.assert_array_equal(km._update(x, a, 6, 1.0, rule, old, block_rows=rows), whole)
        np.testing.assert_array_equal(whole[5], old[5])


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_streamed_updates_are_the_same_bits_on_any_number_of_threads(workers):
    """The blocks' terms on a thread pool, the sums still in row order: the same bits as one thread."""
    rng = np.random.default_rng(23)
    x = mixed_points(rng, 1000, 8, 0.7)
    groups = rng.choice([0, 1, 2, 4, 5], size=len(x))  # group 3 empty
    for rows in (97, 1000):  # several blocks (more than the workers), and one
        read = blocks_of(x, groups, rows)
        for update in (
            lambda read, **kw: ku.einstein_midpoint_blocks(read, 6, 0.7, **kw).numpy(),
            lambda read, **kw: ku.frechet_mean_blocks(read, 6, 0.7, **kw).numpy(),
            lambda read, **kw: ku.mean_blocks(read, 6, **kw),
        ):
            one, many = update(read, workers=1), update(read, workers=workers)
            assert one.tobytes() == many.tobytes()
            assert np.isnan(many[3]).all() and np.isfinite(many[[0, 1, 2, 4, 5]]).all()


@pytest.mark.parametrize(
    ("geometry", "centroid"), [("poincare", "einstein"), ("poincare", "frechet"), ("euclidean", "")]
)
def test_zarr_input_gives_the_numpy_result(tmp_path, geometry, centroid):
    """A zarr array (as the stage passes it) and a numpy array give bit-identical runs, whatever the block size
    (97 rows: ten full blocks and a partial one); the zarr array is only ever read by blocks of rows."""
    rng = np.random.default_rng(23)
    x, _ = hyperbolic_blobs(rng, np.eye(8)[:5] * 0.6, 200, 0.4)
    x = x.astype(np.float32)  # as the embeddings store holds them
    if geometry == "euclidean":
        x = x * 30 + 5
    options = {"geometry": geometry, "seed": 1, "use_gpu": False, "init_size": 300}
    if centroid:
        options["centroid"] = centroid
    ref = kmeans(x, 6, **options)
    reader = RowReader(x)
    runs = [
        kmeans(x, 6, block_rows=97, **options),
        kmeans(zarr_array(tmp_path / "x.zarr", x, 50), 6, block_rows=97, **options),
        kmeans(zarr_array(tmp_path / "y.zarr", x, 50), 6, **options),
        kmeans(reader, 6, block_rows=97, **options),
    ]
    assert ref.iterations >= 2
    for run in runs:
        np.testing.assert_array_equal(run.assignment, ref.assignment)
        np.testing.assert_array_equal(run.distance, ref.distance)
        np.testing.assert_array_equal(run.centroids, ref.centroids)
        assert (run.inertia, run.iterations, run.converged) == (ref.inertia, ref.iterations, ref.converged)
    assert max(reader.reads) == 97 and min(reader.reads) == len(x) % 97 and len(reader.reads) > 11


def test_rows_per_block_follow_the_zarr_chunks(tmp_path, monkeypatch):
    x = np.zeros((1000, 8), dtype=np.float32)
    z = zarr_array(tmp_path / "x.zarr", x, 50)
    assert kb.rows_per_block(x) == kb.BLOCK_ROWS
    assert kb.rows_per_block(np.zeros((10, 1024))) == kb._BLOCK // 1024  # a float64 block of wide rows stays small
    monkeypatch.setattr(kb, "BLOCK_ROWS", 120)
    assert kb.rows_per_block(x) == 120
    assert kb.rows_per_block(z) == 100  # a multiple of the chunk length
    monkeypatch.setattr(kb, "BLOCK_ROWS", 30)
    assert kb.rows_per_block(z) == 50  # at least one chunk
    assert kb.rows_per_block(z, 7) == 7
    with pytest.raises(PipelineError, match="block_rows"):
        kb.rows_per_block(x, 0)
    idx = np.array([0, 49, 50, 51, 777, 999])
    xr = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    for src in (xr, zarr_array(tmp_path / "r.zarr", xr, 50), RowReader(xr)):
        np.testing.assert_array_equal(kb.read_rows(src, idx, 97), xr[idx].astype(np.float64))


class SelectionRecorder:
    """A zarr array whose orthogonal selections are recorded (first and last row of each)."""

    def __init__(self, z) -> None:
        self._z, self.shape, self.dtype, self.chunks = z, z.shape, z.dtype, z.chunks
        self.spans: list[tuple[int, int]] = []

    def get_orthogonal_selection(self, selection):
        rows = np.asarray(selection[0])
        self.spans.append((int(rows.min()), int(rows.max())))
        return self._z.get_orthogonal_selection(selection)


def test_read_rows_asks_zarr_for_one_block_of_rows_at_a_time(tmp_path):
    """The k-means++ sample is read block by block: one selection over the whole array would make zarr read every
    shard it touches whole (up to 128 MB each), several at once."""
    xr = np.random.default_rng(1).normal(size=(1000, 8)).astype(np.float32)
    recorder = SelectionRecorder(zarr_array(tmp_path / "r.zarr", xr, 50))
    idx = np.sort(np.random.default_rng(2).choice(1000, 300, replace=False))
    np.testing.assert_array_equal(kb.read_rows(recorder, idx, 100), xr[idx].astype(np.float64))
    assert len(recorder.spans) == 10 and all(lo // 100 == hi // 100 for lo, hi in recorder.spans)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_checks_split_over_threads_report_the_same_indices(monkeypatch, threads):
    """Shares of each block checked on several workers: the same counts and first indices as one worker."""
    monkeypatch.setattr(kb, "_SHARE", 40)
    x = np.full((1000, 3), 0.01)
    x[[230, 620]] = [0.6, 0.8, 0.0]  # each in a block's second or third share
    x[[990, 520, 521]] = [[np.nan, 0, 0], [0, np.inf, 0], [-np.inf, 0, 0]]
    with pytest.raises(PipelineError, match=r"^3 embeddings contain NaN or inf \(first at index 520\)$"):
        kb.check_points(x, 1.0, 333, threads)
    x[[990, 520, 521]] = 0.01
    with pytest.raises(PipelineError, match=r"^2 embeddings lie on or outside .*first at index 230, \|x\| = 1\)$"):
        kb.check_points(RowReader(x), 1.0, 333, threads)
    x[[230, 620]] = 0.5
    assert kb.check_points(x, 1.0, 333, threads) is x
    assert kb.check_points(x * 10, None, 333, threads) is not None  # no ball: only NaN and inf


def test_checks_report_global_indices_across_blocks():
    x = np.full((1000, 3), 0.01)
    x[500, 2], x[900, 0] = np.nan, np.inf
    with pytest.raises(PipelineError, match=r"^2 embeddings contain NaN or inf \(first at index 500\)$"):
        hyperbolic_kmeans(RowReader(x), 2, block_rows=97)
    x = np.full((1000, 3), 0.01)
    x[[300, 301, 998]] = [0.6, 0.8, 0.0]
    with pytest.raises(PipelineError, match=r"^3 embeddings lie on or outside .*first at index 300, \|x\| = 1\)$"):
        hyperbolic_kmeans(RowReader(x), 2, block_rows=97)


def test_reseed_empty_equals_a_full_sort():
    """The farthest-first walk sorts growing batches; it must re-seed exactly as a full stable sort would
    (ties by index, singletons skipped), also when it needs several batches."""

    def reference(assignment, distance, k):
        counts = np.bincount(assignment, minlength=k)
        empty = list(np.flatnonzero(counts == 0))
        for p in np.argsort(-distance, kind="stable"):
            if not empty:
                break
            g = assignment[p]
            if counts[g] <= 1:
                continue
            counts[g] -= 1
            target = empty.pop(0)
            counts[target] = 1
            assignment[p], distance[p] = target, 0.0

    rng = np.random.default_rng(24)
    for n_empty in (1, 5, 300):
        k = 400 + n_empty
        assignment = np.concatenate([np.arange(400), rng.integers(0, 3, 3000)]).astype(np.int32)  # 397 singletons
        distance = np.round(rng.exponential(size=len(assignment)), 1)  # many ties
        distance[:400] += 100  # the singletons are the farthest: the walk must go past them
        a, d = assignment.copy(), distance.copy()
        reference(a, d, k)
        assert km._reseed_empty(assignment, distance, k) == n_empty
        np.testing.assert_array_equal(assignment, a)
        np.testing.assert_array_equal(distance, d)


# ----------------------------------------------------------------------------------- Euclidean, one loop


def euclidean_brute_force(x: np.ndarray, cent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((x[:, None, :] - cent[None, :, :]) ** 2).sum(-1)
    j = d2.argmin(axis=1)
    return j, np.sqrt(d2[np.arange(len(x)), j])


@pytest.mark.parametrize("d", [2, 16, 64])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_euclidean_assign_equals_float64_brute_force(d, offset):
    rng = np.random.default_rng(d + int(offset))
    x = rng.normal(size=(2000, d)) * rng.uniform(0.1, 10, (2000, 1)) + offset
    spread = np.concatenate([x[rng.choice(len(x), 40, replace=False)], rng.normal(size=(24, d)) * 5 + offset])
    stats: dict = {}
    a, dist = assign(x, spread, geometry="euclidean", use_gpu=False, stats=stats, block_rows=333)
    ref_a, ref_d = euclidean_brute_force(x, spread)
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(dist, assign_exact(x, spread, geometry="euclidean")[1])
    assert stats["fallback"] < len(x) // 10  # certified by the float32 GEMM for most rows
    # 30 centroids within 1e-9 of each other: float32 cannot rank them, its certificate must catch it
    base = x[0] + rng.normal(size=(30, d)) * 1e-9 * max(1.0, offset)
    tight = np.concatenate([base, spread[:30]])
    near = np.concatenate([x[:1500], x[0] + rng.normal(size=(500, d)) * 0.05])
    a, _ = assign(near, tight, geometry="euclidean", use_gpu=False, stats=stats)
    np.testing.assert_array_equal(a, euclidean_brute_force(near, tight)[0])
    a, _ = assign(near, tight, geometry="euclidean", stats=stats, engine=ke._Faiss(False, force_faiss_cpu=True))
    np.testing.assert_array_equal(a, euclidean_brute_force(near, tight)[0])
    assert stats["redone"] > 0


def test_euclidean_and_hyperbolic_kmeans_share_one_lloyd_loop(monkeypatch):
    x = gaussian_blobs()[0] / 100
    seen = []
    real = km._lloyd

    def spy(x, k, geom, centroid, **kwargs):
        seen.append((type(geom).__name__, centroid))
        return real(x, k, geom, centroid, **kwargs)

    monkeypatch.setattr(km, "_lloyd", spy)
    hyperbolic_kmeans(x, 4, use_gpu=False)
    euclidean_kmeans(x, 4, use_gpu=False)
    assert seen == [("Poincare", "einstein"), ("Euclidean", "mean")]


def test_euclidean_kmeans_is_lloyd_with_float64_means():
    x, labels = gaussian_blobs()
    res = euclidean_kmeans(x, 5, seed=0, use_gpu=False)
    assert res.converged
    np.testing.assert_array_equal(res.assignment, euclidean_brute_force(x, res.centroids)[0])
    for j in range(5):  # the fixed point: each centroid is the float64 mean of its points
        np.testing.assert_allclose(res.centroids[j], x[res.assignment == j].mean(axis=0), rtol=1e-12, atol=1e-12)
    zero = euclidean_kmeans(x, 5, seed=0, max_iter=0, use_gpu=False)
    assert zero.iterations == 0 and not zero.converged
    # k-means++ seeds are data points
    assert all((np.abs(x - m).max(axis=1) == 0).any() for m in zero.centroids)
    np.testing.assert_array_equal(zero.assignment, euclidean_brute_force(x, zero.centroids)[0])
