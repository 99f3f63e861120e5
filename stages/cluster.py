"""cluster: k-means over the val embeddings (hyperbolic in the Poincaré ball, or Euclidean), k fixed or at the elbow.

Reads data/val/embeddings.zarr (its attrs give the geometry and curvature) block by block, never whole; writes
data/val/clusters.zarr and the elbow curve (plots/cluster/elbow.csv for `dvc plots`, elbow.png with the chosen k
marked). With cluster.k = auto, k-means runs for every k of cluster.k_range (only the inertias are kept) and once
more at the elbow (the same seed: the sweep's run again); with a fixed k only that k runs, and the curve is its
single point (elbow_k null).

Under `torchrun --nproc_per_node N -m stages.cluster` (or `dist.nproc: N`), the sweep's k values are dealt to
the ranks (rank r runs every N-th k), the inertias are gathered over gloo, and rank 0 alone picks the elbow, runs
the final clustering and writes the store and plots: the same bytes as one process (k-means does not depend on
the thread count). The nearest-centroid search runs on faiss-gpu over every visible GPU in one process, on the
rank's own GPU (LOCAL_RANK) under torchrun, and on the CPU's float64 GEMM without a GPU; the summary line says
which.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import typer

from pipeline.config import as_dict
from pipeline.distributed import Ranks, all_gather, init_ranks, launch_ranks, main_goes_on, shutdown
from pipeline.experiments.plots import elbow_plot
from pipeline.geometry.kmeans import (
    cuda_devices,
    inertia_curve,
    k_sweep,
    kmeans,
    knee,
    search_name,
    visible_gpus,
)
from pipeline.stores.store import atomic_path, open_store, store_array, write_store
from stages.common import Timer, clean_errors, params, split_dir, summary

SPLIT = "val"
ELBOW_CSV = Path("plots/cluster/elbow.csv")
ELBOW_PNG = Path("plots/cluster/elbow.png")

log = logging.getLogger(__name__)


def rank_gpus(ranks: Ranks) -> list[int] | None:
    """The GPUs this rank's search uses: every visible one for one process (None), its own under torchrun (faiss'
    GPUs, else torch's)."""
    n_gpus = visible_gpus() or cuda_devices()
    if ranks.world_size == 1 or n_gpus == 0:
        return None
    return [ranks.local_rank % n_gpus]


def sweep(x, ks: list[int], ranks: Ranks, **options) -> list[tuple[int, float]]:
    """``[(k, inertia)]`` for every k of ``ks``, in that order: this rank runs every world_size-th k, the ranks'
    shares are gathered over the process group when there are several."""
    if ranks.world_size == 1:
        return inertia_curve(x, ks, **options)
    share = ks[ranks.rank :: ranks.world_size]
    log.info("rank %d of %d sweeps k = %s", ranks.rank, ranks.world_size, share)
    shares = all_gather(inertia_curve(x, share, **options), ranks)
    found = dict(pair for share in shares for pair in share)
    return [(k, found[k]) for k in ks]


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    if launch_ranks("stages.cluster", p.dist.nproc, "cpu", ["--params-file", params_file]):
        return
    ranks = init_ranks("cpu")  # gloo: the ranks exchange only the sweep's inertias
    cfg = p.cluster
    source = split_dir(SPLIT) / "embeddings.zarr"
    store = open_store(source, "embeddings")
    x = store_array(store, "embeddings")  # read by blocks of rows inside k-means
    n = x.shape[0]
    geometry, c = store.attrs["geometry"], float(store.attrs["curvature"])
    options = {"geometry": geometry, "c": c, "seed": cfg.seed, "max_iter": cfg.max_iter, "tol": cfg.tol}
    options["centroid"] = cfg.centroid
    options["gpu_devices"] = rank_gpus(ranks)
    if cfg.k == "auto":
        curve = sweep(x, k_sweep(cfg.k_range, n), ranks, **options)
        elbow = k = knee([k for k, _ in curve], [inertia for _, inertia in curve])
        swept = f"elbow of {len(curve)} k at {elbow}" + (
            f" over {ranks.world_size} ranks" if ranks.world_size > 1 else ""
        )
    else:
        k, elbow = int(cfg.k), None
        swept = "no sweep"
    if not main_goes_on(ranks):
        return
    result = kmeans(x, k, **options)  # with auto: the sweep's run at k (deterministic), whose arrays were not kept
    if cfg.k != "auto":
        curve = [(k, result.inertia)]
    with atomic_path(ELBOW_CSV) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["k", "inertia"])
        writer.writerows(curve)
    with atomic_path(ELBOW_PNG) as tmp:
        elbow_plot(curve, elbow, k, tmp, title=f"{geometry} k-means on {n} {SPLIT} embeddings")
    attrs = {
        "split": SPLIT,
        "K": k,
        "k_choice": "elbow" if cfg.k == "auto" else "fixed",
        "elbow_k": elbow,
        "inertia": result.inertia,
        "iterations": result.iterations,
        "converged": result.converged,
        "centroid_rule": cfg.centroid if geometry == "poincare" else "euclidean mean",
        "geometry": geometry,
        "curvature": c,
        "params": {"cluster": as_dict(cfg)},
        "source": str(source),
        "source_fingerprint": store.attrs["fingerprint"],
        "counts": {
            "points": n,
            "clusters": k,
            "nonempty": int(np.count_nonzero(np.bincount(result.assignment, minlength=k))),
        },
    }
    out = split_dir(SPLIT) / "clusters.zarr"
    arrays = {"assignment": result.assignment, "distance": result.distance, "centroids": result.centroids}
    write_store(out, arrays, attrs, kind="clusters")
    summary(
        "cluster",
        f"{geometry} k-means, k={k} ({attrs['k_choice']}; {swept}) on {n} points, "
        f"{result.iterations} iterations, inertia {result.inertia:.4g}, search: "
        f"{search_name(None, options['gpu_devices'])}; wrote {out}",
        timer,
    )
    shutdown(ranks)


if __name__ == "__main__":
    typer.run(main)
