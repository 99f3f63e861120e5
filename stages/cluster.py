"""cluster: k-means over the val embeddings (hyperbolic in the Poincaré ball, or Euclidean), k fixed or at the elbow.

Reads data/val/embeddings.zarr (its attrs give the geometry and curvature) block by block, never whole; writes
data/val/clusters.zarr and the elbow curve (plots/cluster/elbow.csv for `dvc plots`, elbow.png with the chosen k
marked). With cluster.k = auto, k-means runs for every k of cluster.k_range (only the inertias are kept) and once
more at the elbow (the same seed: the sweep's run again); with a fixed k only that k runs, and the curve is its
single point (elbow_k null).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import typer

from pipeline.config import as_dict
from pipeline.kmeans import faiss_backend, inertia_curve, k_sweep, kmeans, knee
from pipeline.plots import elbow_plot
from pipeline.store import atomic_path, open_store, store_array, write_store
from stages.common import Timer, clean_errors, params, split_dir, summary

SPLIT = "val"
ELBOW_CSV = Path("plots/cluster/elbow.csv")
ELBOW_PNG = Path("plots/cluster/elbow.png")


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    cfg = p.cluster
    source = split_dir(SPLIT) / "embeddings.zarr"
    store = open_store(source, "embeddings")
    x = store_array(store, "embeddings")  # read by blocks of rows inside k-means
    n = x.shape[0]
    geometry, c = store.attrs["geometry"], float(store.attrs["curvature"])
    options = {"geometry": geometry, "c": c, "seed": cfg.seed, "max_iter": cfg.max_iter, "tol": cfg.tol}
    options["centroid"] = cfg.centroid
    if cfg.k == "auto":
        curve = inertia_curve(x, k_sweep(cfg.k_range, n), **options)
        elbow = k = knee([k for k, _ in curve], [inertia for _, inertia in curve])
        result = kmeans(x, k, **options)  # deterministic: the sweep's run at k, whose arrays were not kept
        swept = f"elbow of {len(curve)} k at {elbow}"
    else:
        k, elbow = int(cfg.k), None
        result = kmeans(x, k, **options)
        curve = [(k, result.inertia)]
        swept = "no sweep"
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
        "faiss": faiss_backend(),
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
        f"{result.iterations} iterations, inertia {result.inertia:.4g}, {attrs['faiss']}; wrote {out}",
        timer,
    )


if __name__ == "__main__":
    typer.run(main)
