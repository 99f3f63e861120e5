"""Benchmark of the cluster stage's nearest-centroid assignment, one Lloyd iteration and one evaluation (a script,
not a test).

1. The assignment `kmeans.assign` (hyperbolic, c = 1, and Euclidean) against faiss' Euclidean search of the
   same arrays (``IndexFlatL2``, float32, k = 1: the nearest centroid, uncertified; and k = 2, the top-2 a
   certificate needs), each timed ``--repeat`` times (best kept, faiss and ours interleaved: the 2-core development
   machine is shared), with the shares of rows redone in float64 and decided over their near-ties. The
   assignment is checked against a direct pairwise float64 reference written here (the closed form ``arcosh(1 +
   2|x-y|^2 / ((1-|x|^2)(1-|y|^2)))`` over every point/centroid pair, blockwise in numpy; Euclidean: the squared
   distance) on ``--check-rows`` random rows (0: all): the assignments must be identical.
2. One Lloyd iteration: the assignment plus the Einstein-midpoint centroid update (hyperbolic).
3. The fused top-2 kernel alone (float32, float64) against faiss' k = 1 search on random arrays (d = 16).
4. Euclidean k-means against `faiss.Kmeans` (float32, uncertified) on ``--lloyd-n`` points: seconds per iteration.
5. With ``--profile``: where one hyperbolic assignment's time goes, per d (each step's time summed over threads;
   on a CUDA search also torch.profiler's operators by device time), to see the CPU's share of a GPU search.
6. One evaluation of the val split (`pipeline.evaluation.evaluate.evaluate_clusters`) when `dvc repro` has produced
   data/val/{proposals,clusters}.zarr and data/prepared/dataset.json.

    python benchmarks/bench_kmeans.py                        # N=200000, K=1462, d in 16,256, 2 threads
    python benchmarks/bench_kmeans.py --scale 0.1 --skip-eval  # N=20000, K=146: a quick run

Synthetic data (``--max-radius R``, default 7.6, i.e. ``1 - |x|`` down to 1e-3): K cluster centres ``expmap0(v)``
with Gaussian tangent directions and hyperbolic radii ``2|v|`` from 0.2 to 4 (80%) or 4 to R (20%, next to the
boundary); cluster sizes long-tailed (probability ~ rank^-0.8); each point is its centre Möbius-added to
``expmap0(u)`` (hyperbolic distance ``2|u|`` from the centre, spread 0.05 to 0.5 per cluster), then clamped to
distance R from the origin. The centroids are K distinct data points drawn at random (the state after seeding: many
clusters hold several centroids, so near-ties are common). The Euclidean rows use the same arrays.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="points")
    parser.add_argument("--k", type=int, default=1462, help="centroids")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --n, --k and --lloyd-n (quick runs)")
    parser.add_argument("--dims", default="16,256", help="comma-separated dimensions")
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss / BLAS / OpenMP threads")
    parser.add_argument("--repeat", type=int, default=3, help="timings per measurement (the best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-radius", type=float, default=7.6, help="largest distance of a point from the origin")
    parser.add_argument("--check-rows", type=int, default=20_000, help="rows checked against the reference (0: all)")
    parser.add_argument("--block-mb", type=float, default=128.0, help="size of the reference's difference block")
    parser.add_argument("--lloyd-n", type=int, default=50_000, help="points of the Euclidean k-means comparison")
    parser.add_argument("--lloyd-k", type=int, default=100, help="clusters of the Euclidean k-means comparison")
    parser.add_argument("--skip-eval", action="store_true", help="do not time the val evaluation")
    parser.add_argument(
        "--profile", action="store_true", help="time the steps of one hyperbolic assignment (torch's operators on CUDA)"
    )
    return parser.parse_args()


ARGS = parse_args()
# numpy's BLAS and OpenMP pools read these when numpy (and torch, faiss) are first imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from pipeline.geometry import hyperbolic as hyp  # noqa: E402
from pipeline.geometry import kmeans_assign, kmeans_engines, kmeans_fused, kmeans_tiles, kmeans_torch  # noqa: E402
from pipeline.geometry.kmeans import assign, euclidean_kmeans, search_name  # noqa: E402
from pipeline.geometry.kmeans_terms import Poincare  # noqa: E402
from pipeline.geometry.kmeans_update import _update  # noqa: E402

# --------------------------------------------------------------------------------------------------- data


def synthetic(n: int, k: int, d: int, seed: int, max_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(points (n, d), centroids (k, d)) in the unit Poincaré ball, float64; see the module doc."""
    rng = np.random.default_rng(seed)
    mid = min(4.0, max_radius)
    radius = np.where(rng.random(k) < 0.8, rng.uniform(0.2, mid, k), rng.uniform(mid, max_radius, k))
    eps = 2 / (1 + np.exp(max_radius))  # 1 - tanh(R / 2): points stay within distance R of the origin
    direction = rng.normal(size=(k, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    centres = hyp.expmap0(direction * (radius / 2)[:, None])
    p = 1.0 / np.arange(1, k + 1) ** 0.8
    labels = rng.choice(k, size=n, p=p / p.sum())
    spread = rng.uniform(0.05, 0.5, k)
    x = np.empty((n, d))
    step = 50_000
    for i in range(0, n, step):
        lab = labels[i : i + step]
        u = rng.normal(size=(len(lab), d)) * (spread[lab] / (2 * np.sqrt(d)))[:, None]
        x[i : i + step] = hyp.project(hyp.mobius_add(centres[lab], hyp.expmap0(u)), 1.0, eps)
    centroids = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    return x, centroids


# ---------------------------------------------------------------------------------------------- reference


def reference_assign(x: np.ndarray, cent: np.ndarray, block_mb: float, hyperbolic: bool) -> np.ndarray:
    """Nearest centroid by the closed form over every pair, float64, blockwise (ties: lowest index).

    ``1 - |x|^2`` is evaluated as ``(1 - |x|)(1 + |x|)`` (no cancellation next to the boundary)."""
    k, d = cent.shape
    nx, nc = np.linalg.norm(x, axis=1), np.linalg.norm(cent, axis=1)
    den_x, den_c = (1 - nx) * (1 + nx), (1 - nc) * (1 + nc)
    rows = max(1, int(block_mb * 2**20 / 8) // (k * d))
    assignment = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), rows):
        s = slice(i, i + rows)
        diff = x[s, None, :] - cent[None, :, :]
        sq = np.einsum("ijk,ijk->ij", diff, diff)
        value = np.arccosh(1 + 2 * sq / (den_x[s, None] * den_c[None, :])) if hyperbolic else sq
        assignment[s] = value.argmin(axis=1)
    return assignment


# ------------------------------------------------------------------------------------------------ timings


def best(fn, repeat: int):
    """(the last result, the best of ``repeat`` wall times)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def faiss_search(x32: np.ndarray, c32: np.ndarray, k: int) -> float:
    index = faiss.IndexFlatL2(x32.shape[1])
    index.add(c32)
    return best(lambda: index.search(x32, k), ARGS.repeat)[1]


def bench_fused_kernel(n: int, k: int, d: int = 16) -> None:
    """The fused top-2 kernel alone (kmeans_fused, float32 and float64, on ``--threads`` Python threads in tiles of
    kmeans_assign._FUSED_ROWS rows, as the assignment runs it) against faiss' fused k = 1 search of the first d
    columns (what its d-dimensional L2 search multiplies), on random arrays: the GEMM limit the assignment's
    other work adds to."""
    from concurrent.futures import ThreadPoolExecutor

    if not kmeans_fused.width():
        print("\nfused kernel not built: skipped")
        return
    rng = np.random.default_rng(ARGS.seed)
    terms = d + 2
    xa, base = rng.normal(size=(n, terms)), rng.normal(size=(terms, k))
    xa[:, -1] = 1  # x''s constant term, as the kernel requires
    x32, c32 = np.ascontiguousarray(xa[:, :d], dtype=np.float32), np.ascontiguousarray(base[:d].T, dtype=np.float32)
    rows = kmeans_assign._FUSED_ROWS
    tiles = [slice(i, i + rows) for i in range(0, n, rows)]
    with ThreadPoolExecutor(ARGS.threads) as pool:
        times = {}
        for real in (np.float32, np.float64):
            xr, padded = xa.astype(real), kmeans_fused.pad(base.astype(real))
            times[real] = best(
                lambda xr=xr, p=padded: list(pool.map(lambda s: kmeans_fused.top2(xr[s], p, k), tiles)), ARGS.repeat
            )[1]
    t_faiss = faiss_search(x32, c32, 1)
    print(
        f"\n## The fused kernel alone ({kmeans_fused.width()}-bit), N={n}, K={k}, {terms} terms (d={d}), "
        f"{ARGS.threads} threads, best of {ARGS.repeat}\n"
    )
    print("| | seconds | / faiss k=1 |\n|---|---|---|")
    print(f"| faiss k=1, d={d} (float32) | {t_faiss:.3f} | 1.00x |")
    for real, t in times.items():
        print(f"| fused top-2, {np.dtype(real).name} | {t:.3f} | {t / t_faiss:.2f}x |")


def bench_assign(n: int, k: int, dims: list[int]) -> None:
    print(
        f"\n## Nearest-centroid assignment, N={n}, K={k}, max radius {ARGS.max_radius} (seconds, best of "
        f"{ARGS.repeat})\n"
    )
    print(
        "`ours`: kmeans.assign (input check + certified search + distances); `faiss k=1`: IndexFlatL2 "
        "search of the same arrays in float32 (nearest centroid, uncertified); `faiss k=2`: its top-2; "
        "`ours, numpy GEMM`: ours without the fused float32 top-2 kernel (pipeline.geometry.kmeans_fused; only where "
        "the CPU search runs it, d <= 64), the same assignments required; "
        "`float64 rows`: rows redone in the float64 GEMM (float32 left them more than kmeans_tiles._WIDE "
        "near-ties); `near-tie rows`: rows the certificate left open, decided by the reference value over the "
        "centroids it could not rule out; "
        "`differences`: against the float64 closed form on the checked rows.\n"
    )
    head = [
        "geometry",
        "d",
        "faiss k=1",
        "ours",
        "ours / faiss k=1",
        "ours, numpy GEMM",
        "numpy GEMM / ours",
        "faiss k=2",
        "float64 rows",
        "near-tie rows",
        "checked",
        "differences",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    failures, lloyd, profiled = [], [], []
    for d in dims:
        x, cent = synthetic(n, k, d, ARGS.seed, ARGS.max_radius)
        x32, c32 = x.astype(np.float32), cent.astype(np.float32)
        check = (
            np.arange(n)
            if ARGS.check_rows <= 0 or ARGS.check_rows >= n
            else np.sort(np.random.default_rng(1).choice(n, ARGS.check_rows, replace=False))
        )
        for geometry in ("poincare", "euclidean"):
            stats: dict = {}
            assign(x[:1000], cent, geometry=geometry)  # warm-up
            t_faiss = faiss_search(x32, c32, 1)
            (a, _), t_ours = best(
                lambda x=x, c=cent, g=geometry, s=stats: assign(x, c, geometry=g, stats=s), ARGS.repeat
            )
            t_faiss = min(t_faiss, faiss_search(x32, c32, 1))  # interleaved: the machine is shared
            t_k2 = faiss_search(x32, c32, 2)
            numpy_gemm = "| — | — "
            if kmeans_engines._Faiss(None).fused and d + 2 <= kmeans_fused.MAX_TERMS:
                engine = kmeans_engines._Faiss(None, fused=False)
                (a_numpy, _), t_numpy = best(
                    lambda x=x, c=cent, g=geometry, e=engine: assign(x, c, geometry=g, engine=e), ARGS.repeat
                )
                if not np.array_equal(a_numpy, a):
                    failures.append(f"{geometry} d={d}: the numpy GEMM's assignments differ from the fused kernel's")
                numpy_gemm = f"| {t_numpy:.3f} | {t_numpy / t_ours:.2f}x "
            ref = reference_assign(x[check], cent, ARGS.block_mb, geometry == "poincare")
            differences = int(np.count_nonzero(a[check] != ref))
            print(
                f"| {geometry} | {d} | {t_faiss:.3f} | {t_ours:.3f} | {t_ours / t_faiss:.2f}x {numpy_gemm}"
                f"| {t_k2:.3f} | "
                f"{stats['redone'] / n:.1%} | {stats['fallback'] / n:.1%} | {len(check)} | {differences} |",
                flush=True,
            )
            if differences:
                failures.append(f"{geometry} d={d}: {differences} differences")
            if geometry == "poincare" and ARGS.profile:
                profiled.append((d, x, cent))
            if geometry == "poincare":
                _, t_update = best(lambda x=x, a=a, cent=cent: _update(x, a, k, 1.0, "einstein", cent), 1)
                lloyd.append(f"d={d}: assign {t_ours:.3f} s + Einstein midpoint update {t_update:.3f} s")
    print("\nOne hyperbolic Lloyd iteration: " + "; ".join(lloyd))
    for d, x, cent in profiled:
        profile_assign(d, x, cent)
        profile_update(d, x, cent)
    assert not failures, "assignments differ from the float64 closed form: " + "; ".join(failures)


_PROFILED = [  # (owner, attribute): where each function is looked up when called, the search's methods, the row terms
    *((kmeans_assign, name) for name in ("check_points", "read_block", "_gemm", "_near_ties", "_certify", "_exact")),
    *((kmeans_tiles, name) for name in ("_gemm", "_augment", "_top2", "_certify", "_exact", "_sq_diff")),
    *((kmeans_assign._Assigner, name) for name in ("_rows", "_cpu", "_torch", "_faiss", "_finish")),
    *((kmeans_torch, name) for name in ("queue", "collect")),
    (kmeans_fused, "top2"),
    (Poincare, "rows"),
    (Poincare, "value"),
    (Poincare, "distance"),
]


def profile_assign(d: int, x: np.ndarray, cent: np.ndarray) -> None:
    """Where one hyperbolic assignment's time goes: the wall time of each of kmeans_assign's steps, summed over
    the calls on every thread (inclusive: `_torch` contains `collect`, `_gemm` contains `_top2` and `top2`, and its
    float64 redo is a nested `_gemm` counted again; `queue` queues the
    device's work and `collect` waits for it), against the call's wall time; on a CUDA search also torch.profiler's
    operators by device time."""
    assign(x, cent)  # warm-up: the device's kernels and the worker pool
    spent: dict[str, list[float]] = {}
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    entry = spent.setdefault(name, [0, 0.0])
                    entry[0] += 1
                    entry[1] += time.perf_counter() - start

        return wrapper

    originals = [(owner, name, getattr(owner, name)) for owner, name in _PROFILED]
    try:
        for owner, name, fn in originals:
            setattr(owner, name, timed(name, fn))
        start = time.perf_counter()
        assign(x, cent)
        wall = time.perf_counter() - start
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    print(f"\n### Steps of one hyperbolic assignment, d={d}: {wall:.3f} s wall, {ARGS.threads} threads\n")
    print("| step | calls | seconds (summed over threads) | / wall |\n|---|---|---|---|")
    for name, (calls, seconds) in sorted(spent.items(), key=lambda item: -item[1][1]):
        print(f"| {name} | {calls} | {seconds:.4f} | {seconds / wall:.2f} |")
    if torch.cuda.is_available() and "cuda" in search_name():
        from torch.profiler import ProfilerActivity, profile

        try:  # the tables above stand without it
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                assign(x, cent)
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=10)
        except Exception as error:  # noqa: BLE001
            table = f"torch.profiler failed: {error!r}"
        print(f"\ntorch.profiler, d={d}:\n\n```\n{table.rstrip()}\n```")
        top2_on_device(len(cent))


def profile_update(d: int, x: np.ndarray, cent: np.ndarray) -> None:
    """torch.profiler's operators (CPU) in one Einstein midpoint update of the clusters ``assign`` gives: on the
    lent H100 machine the d = 16 update took 0.108 s against 0.02-0.03 s on the 2-core machine, cause unknown."""
    from torch.profiler import ProfilerActivity, profile

    a, _ = assign(x, cent)
    _, wall = best(lambda: _update(x, a, len(cent), 1.0, "einstein", cent), ARGS.repeat)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _update(x, a, len(cent), 1.0, "einstein", cent)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    print(f"\n### One Einstein midpoint update, d={d}: {wall:.3f} s (best of {ARGS.repeat}), its operators\n")
    print(f"```\n{table.rstrip()}\n```")


def top2_on_device(k: int, rows: int = 22_951, repeat: int = 10) -> None:
    """The torch search's top-2 of one float64 tile on the GPU (rows x k: kmeans_torch._DEVICE_TILE elements):
    `smallest_two`'s two reductions against ``topk(2)``, the baseline, in the same run."""
    tile = torch.randn(rows, k, dtype=torch.float64, device="cuda")

    def timed(fn) -> float:
        fn(tile.clone())  # warm-up
        best_ms = math.inf
        for _ in range(repeat):
            work = tile.clone()
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn(work)
            torch.cuda.synchronize()
            best_ms = min(best_ms, 1e3 * (time.perf_counter() - start))
        return best_ms

    t_topk = timed(lambda t: t.topk(2, dim=1, largest=False))
    t_two = timed(kmeans_torch.smallest_two)
    print(
        f"\ntop-2 of a {rows} x {k} float64 tile on the GPU (best of {repeat}): topk(2) {t_topk:.2f} ms, "
        f"smallest_two {t_two:.2f} ms ({t_topk / t_two:.1f}x)"
    )


def bench_euclidean_kmeans(n: int, k: int, d: int = 16, iterations: int = 10) -> None:
    print(f"\n## Euclidean k-means against faiss.Kmeans, N={n}, K={k}, d={d}, {iterations} iterations\n")
    rng = np.random.default_rng(ARGS.seed)
    centres = rng.normal(size=(k, d)) * 3
    x = centres[rng.integers(0, k, n)] + rng.normal(size=(n, d))
    ours, t_ours = best(lambda: euclidean_kmeans(x, k, seed=0, max_iter=iterations, tol=0.0), ARGS.repeat)
    km = faiss.Kmeans(d, k, niter=iterations, seed=1, max_points_per_centroid=n)
    _, t_faiss = best(lambda: km.train(x.astype(np.float32)), ARGS.repeat)
    print("| | seconds | per iteration |\n|---|---|---|")
    print(f"| euclidean_kmeans (float64, certified assignment) | {t_ours:.3f} | {t_ours / ours.iterations:.4f} |")
    print(f"| faiss.Kmeans (float32) | {t_faiss:.3f} | {t_faiss / iterations:.4f} |")
    print(f"\nratio per iteration: {(t_ours / ours.iterations) / (t_faiss / iterations):.2f}x")


# --------------------------------------------------------------------------------------------- evaluation


def bench_eval() -> None:
    print("\n## One evaluation of the val split (pipeline.evaluation.evaluate.evaluate_clusters)\n")
    os.chdir(ROOT)  # the manifest and stores use paths relative to the repository root
    needed = [Path("data/val/proposals.zarr"), Path("data/val/clusters.zarr"), Path("data/prepared/dataset.json")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(f"skipped: {', '.join(missing)} missing (run `dvc repro` first)")
        return
    from pipeline.config import load_params
    from pipeline.data.dataset import read_manifest
    from pipeline.evaluation.evaluate import evaluate_clusters, metrics_table
    from pipeline.evaluation.lvis_eval import load_lvis
    from pipeline.stores.store import open_store, read_array

    start = time.perf_counter()
    cfg = load_params("params.yaml").evaluate
    manifest = read_manifest(needed[2])
    gt = load_lvis(manifest.split_json("val"))
    proposals = open_store(needed[0], "proposals")
    clusters = open_store(needed[1], "clusters")
    arrays = {
        name: read_array(proposals, name) for name in ("image_ids", "image_hw", "image_offsets", "boxes", "scores")
    }
    masks = read_array(proposals, "masks")
    assignment = read_array(clusters, "assignment")
    k = int(clusters.attrs["K"])
    t_load = time.perf_counter() - start
    result, t_eval = best(
        lambda: evaluate_clusters(
            gt,
            arrays["image_ids"],
            arrays["image_hw"],
            arrays["image_offsets"],
            arrays["boxes"],
            arrays["scores"],
            masks,
            assignment,
            k,
            iou_threshold=cfg.match_iou,
            max_per_image=cfg.max_dets,
            progress=False,
        ),
        1,
    )
    counts = result.metrics["counts"]
    print(
        f"{counts['proposals']} proposals on {counts['images']} images, k = {k}: "
        f"loading {t_load:.2f} s, evaluate_clusters {t_eval:.2f} s\n"
    )
    print(metrics_table(result.metrics))


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    faiss.omp_set_num_threads(ARGS.threads)
    dims = [int(v) for v in ARGS.dims.split(",") if v.strip()]
    n, k = max(2, round(ARGS.n * ARGS.scale)), max(2, round(ARGS.k * ARGS.scale))
    print(
        f"faiss {faiss.__version__}, numpy {np.__version__}, torch {torch.__version__}, {ARGS.threads} threads, "
        f"{os.cpu_count()} CPUs; search: {search_name()}"
    )
    bench_fused_kernel(n, k)
    bench_assign(n, k, dims)
    bench_euclidean_kmeans(max(2 * ARGS.lloyd_k, round(ARGS.lloyd_n * ARGS.scale)), ARGS.lloyd_k)
    if ARGS.skip_eval:
        print("\nevaluation skipped (--skip-eval)")
    else:
        bench_eval()


if __name__ == "__main__":
    main()
