"""cluster: k-means over the val embeddings (hyperbolic in the Poincaré ball, or Euclidean), k fixed or at the elbow.

Reads data/val/embeddings.zarr (its attrs give the geometry and curvature); writes data/val/clusters.zarr
and the elbow curve (plots/cluster/elbow.csv for `dvc plots`, elbow.png with the chosen k marked).
"""

from __future__ import annotations

import csv
from pathlib import Path

import typer

from pipeline.config import as_dict
from pipeline.kmeans import faiss_backend, k_sweep, kmeans, knee
from pipeline.plots import elbow_plot
from pipeline.store import atomic_path, open_store, read_array, write_store
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
    x = read_array(store, "embeddings")
    geometry, c = store.attrs["geometry"], float(store.attrs["curvature"])
    options = {"geometry": geometry, "c": c, "seed": cfg.seed, "max_iter": cfg.max_iter, "tol": cfg.tol}
    options["centroid"] = cfg.centroid
    ks = k_sweep(cfg.k_range, len(x))
    runs = {k: kmeans(x, k, **options) for k in ks}
    curve = [(k, run.inertia) for k, run in runs.items()]
    elbow = knee(list(runs), [run.inertia for run in runs.values()])
    k = elbow if cfg.k == "auto" else int(cfg.k)
    result = runs[k] if k in runs else kmeans(x, k, **options)
    with atomic_path(ELBOW_CSV) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["k", "inertia"])
        writer.writerows(curve)
    with atomic_path(ELBOW_PNG) as tmp:
        elbow_plot(curve, elbow, k, tmp, title=f"{geometry} k-means on {len(x)} {SPLIT} embeddings")
    attrs = {
        "split": SPLIT,
        "K": k,
        "k_choice": "elbow" if cfg.k == "auto" else "fixed",
        "elbow_k": elbow,
        "inertia": result.inertia,
        "iterations": result.iterations,
        "converged": result.converged,
        "centroid_rule": cfg.centroid if geometry == "poincare" else "euclidean mean (faiss)",
        "geometry": geometry,
        "curvature": c,
        "faiss": faiss_backend(),
        "params": {"cluster": as_dict(cfg)},
        "source": str(source),
        "source_fingerprint": store.attrs["fingerprint"],
        "counts": {"points": len(x), "clusters": k, "nonempty": int(len(set(result.assignment.tolist())))},
    }
    out = split_dir(SPLIT) / "clusters.zarr"
    arrays = {"assignment": result.assignment, "distance": result.distance, "centroids": result.centroids}
    write_store(out, arrays, attrs, kind="clusters")
    summary(
        "cluster",
        f"{geometry} k-means, k={k} ({attrs['k_choice']}; elbow of {len(ks)} k at {elbow}) on {len(x)} points, "
        f"{result.iterations} iterations, inertia {result.inertia:.4g}, {attrs['faiss']}; wrote {out}",
        timer,
    )


if __name__ == "__main__":
    typer.run(main)
