"""Benchmark of the cluster stage's Lloyd iteration and of one evaluation (a script, not a test).

1. One Lloyd iteration of hyperbolic k-means (c = 1) on seeded synthetic points: the assignment of every point
   to its nearest centroid through faiss (`pipeline.kmeans.assign`, 4 candidates, certified, exact fallback)
   against a direct pairwise float64 reference written here (the closed-form distance
   ``arcosh(1 + 2|x-y|^2 / ((1-|x|^2)(1-|y|^2)))`` over every point/centroid pair, blockwise in numpy), plus
   the Einstein-midpoint centroid update they share. The two assignments must be identical.
2. One evaluation of the val split (`pipeline.evaluation.evaluate.evaluate_clusters`, as stages/evaluate.py
   calls it) when `dvc repro` has produced data/val/{proposals,clusters}.zarr and data/prepared/dataset.json.

    python benchmarks/bench_kmeans.py                       # N=200000, K=1462, d in 2,16,256, 2 threads
    python benchmarks/bench_kmeans.py --n 20000 --k 200 --dims 2,16 --skip-eval

Synthetic data (``--max-radius R``, default 6.21): K cluster centres ``expmap0(v)`` with Gaussian tangent
directions and hyperbolic radii ``2|v|`` from 0.2 to 4 (80%) or 4 to R (20%, next to the boundary); cluster sizes
long-tailed (probability ~ rank^-0.8); each point is its centre Möbius-added to ``expmap0(u)`` (hyperbolic
distance ``2|u|`` from the centre, spread 0.05 to 0.5 per cluster), then clamped to distance R from the origin.
R = 6.21 is where the embedder's float32 projection (``1 - |x| >= 4e-3``) puts real embeddings at most; larger R
(e.g. 11: ``1 - |x|`` down to 3e-5) stress the faiss certificate, whose float32 error bound grows with the
largest centroid norm. The centroids of the timed iteration are K distinct data points drawn at random (the
state after seeding). Every step is timed once (the reference is ``O(N K d)`` and slow at d = 256); faiss gets
one untimed warm-up call on a small subset first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="points")
    parser.add_argument("--k", type=int, default=1462, help="centroids")
    parser.add_argument("--dims", default="2,16,256", help="comma-separated dimensions")
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss / BLAS / OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-radius", type=float, default=6.21, help="largest distance of a point from the origin")
    parser.add_argument("--block-mb", type=float, default=128.0, help="size of the reference's difference block")
    parser.add_argument("--skip-eval", action="store_true", help="do not time the val evaluation")
    return parser.parse_args()


ARGS = parse_args()
# numpy's BLAS and OpenMP pools read these when numpy (and torch, faiss) are first imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from pipeline import hyperbolic as hyp  # noqa: E402
from pipeline.kmeans import _Assigner, _Faiss, _update, assign, faiss_backend  # noqa: E402

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


def reference_assign(x: np.ndarray, cent: np.ndarray, block_mb: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by the closed-form distance over every pair, float64, blockwise (ties: lowest index).

    ``1 - |x|^2`` is evaluated as ``(1 - |x|)(1 + |x|)`` (no cancellation next to the boundary)."""
    k, d = cent.shape
    nx, nc = np.linalg.norm(x, axis=1), np.linalg.norm(cent, axis=1)
    den_x, den_c = (1 - nx) * (1 + nx), (1 - nc) * (1 + nc)
    rows = max(1, int(block_mb * 2**20 / 8) // (k * d))
    assignment = np.empty(len(x), dtype=np.int64)
    distance = np.empty(len(x))
    for i in range(0, len(x), rows):
        s = slice(i, i + rows)
        diff = x[s, None, :] - cent[None, :, :]
        sq = np.einsum("ijk,ijk->ij", diff, diff)
        dist = np.arccosh(1 + 2 * sq / (den_x[s, None] * den_c[None, :]))
        j = dist.argmin(axis=1)
        assignment[s] = j
        distance[s] = dist[np.arange(len(j)), j]
    return assignment, distance


# ------------------------------------------------------------------------------------------------ k-means


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_lloyd(n: int, k: int, dims: list[int], seed: int, block_mb: float, max_radius: float) -> None:
    print(f"\n## One Lloyd iteration, N={n}, K={k}, c=1, max radius {max_radius} (seconds, each timed once)\n")
    print(
        "`assign()`: pipeline.kmeans.assign (input check + search + re-rank + certificate + fallback); "
        "`in loop`: the same without the input check (what hyperbolic_kmeans pays per iteration); "
        "`reference`: pairwise float64 closed form; `update`: Einstein midpoint, shared.\n"
    )
    print(
        f"| {'d':>4} | {'assign()':>8} | {'in loop':>8} | {'fallback':>8} | {'reference':>9} | {'update':>7} | "
        f"{'iter faiss':>10} | {'iter ref':>9} | {'assign speed-up':>15} | {'iter speed-up':>13} | "
        f"{'differences':>11} | {'max |dist diff|':>15} |"
    )
    widths = (4, 8, 8, 8, 9, 7, 10, 9, 15, 13, 11, 15)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    failures = []
    for d in dims:
        x, cent = synthetic(n, k, d, seed, max_radius)
        assign(x[: min(n, 1000)], cent, candidates=4)  # warm-up (faiss / GPU initialisation)
        stats: dict = {}
        (a_faiss, dist_faiss), t_assign = timed(lambda x=x, cent=cent, s=stats: assign(x, cent, 1.0, 4, stats=s))
        assigner = _Assigner(x, 1.0, _Faiss(None), 4)
        (a_loop, _), t_loop = timed(lambda a=assigner, cent=cent: a(cent))
        (a_ref, dist_ref), t_ref = timed(lambda x=x, cent=cent: reference_assign(x, cent, block_mb))
        _, t_update = timed(lambda x=x, a=a_faiss, cent=cent: _update(x, a, k, 1.0, "einstein", cent))
        assert np.array_equal(a_loop, a_faiss), f"d={d}: assign() and the in-loop assigner disagree"
        differences = int(np.count_nonzero(a_faiss != a_ref))
        max_diff = float(np.max(np.abs(dist_faiss - dist_ref)))
        print(
            f"| {d:>4} | {t_assign:>8.3f} | {t_loop:>8.3f} | {stats['fallback']:>8} | {t_ref:>9.3f} | "
            f"{t_update:>7.3f} | {t_assign + t_update:>10.3f} | {t_ref + t_update:>9.3f} | "
            f"{t_ref / t_assign:>14.1f}x | {(t_ref + t_update) / (t_assign + t_update):>12.1f}x | "
            f"{differences:>11} | {max_diff:>15.2e} |",
            flush=True,
        )
        if differences:
            rows = np.flatnonzero(a_faiss != a_ref)
            failures.append(f"d={d}: {differences} differences (first rows {rows[:5].tolist()})")
    assert not failures, "faiss and reference assignments differ: " + "; ".join(failures)


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
    from pipeline.store import open_store, read_array

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
    result, t_eval = timed(
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
        )
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
    print(
        f"faiss {faiss.__version__}, numpy {np.__version__}, torch {torch.__version__}, "
        f"{ARGS.threads} threads, {faiss_backend()}"
    )
    bench_lloyd(ARGS.n, ARGS.k, dims, ARGS.seed, ARGS.block_mb, ARGS.max_radius)
    if ARGS.skip_eval:
        print("\nevaluation skipped (--skip-eval)")
    else:
        bench_eval()


if __name__ == "__main__":
    main()
