"""evaluate: the clusters of the val proposals scored as LVIS mask AP under both protocols, plus the oracle.

Reads data/val/{proposals,samples,embeddings,clusters}.zarr and the val ground truth; writes
metrics/eval.json (DVC metrics), metrics/detections_<row>.json (the LVIS results that were scored) and the
pictures: the Poincaré disk, per-bucket AP bars.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from pipeline.config import as_dict
from pipeline.data.dataset import read_manifest
from pipeline.evaluation.evaluate import ROWS, evaluate_clusters, metrics_table
from pipeline.evaluation.lvis_eval import load_lvis
from pipeline.experiments.plots import bucket_ap_bars, poincare_disk
from pipeline.geometry.disk import disk_coordinates
from pipeline.stores.store import atomic_path, check_source, open_store, read_array, store_array, write_json
from stages.common import MANIFEST, Timer, clean_errors, params, split_dir, summary

SPLIT = "val"
METRICS = Path("metrics/eval.json")
DISK_PNG = Path("plots/evaluate/poincare_disk.png")
BARS_PNG = Path("plots/evaluate/ap_by_bucket.png")


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    cfg = p.evaluate
    manifest = read_manifest(MANIFEST)
    folder = split_dir(SPLIT)
    paths = {kind: folder / f"{kind}.zarr" for kind in ("proposals", "samples", "embeddings", "clusters")}
    stores = {kind: open_store(path, kind) for kind, path in paths.items()}
    check_source(stores["samples"], stores["proposals"], paths["samples"], paths["proposals"])
    check_source(stores["embeddings"], stores["samples"], paths["embeddings"], paths["samples"])
    check_source(stores["clusters"], stores["embeddings"], paths["clusters"], paths["embeddings"])
    proposals = stores["proposals"]
    gt = load_lvis(manifest.split_json(SPLIT))
    assignment = read_array(stores["clusters"], "assignment")
    k = int(stores["clusters"].attrs["K"])
    result = evaluate_clusters(
        gt,
        read_array(proposals, "image_ids"),
        read_array(proposals, "image_hw"),
        read_array(proposals, "image_offsets"),
        proposals["boxes"],  # zarr arrays: masks are pasted block by block, never all in memory
        read_array(proposals, "scores"),
        proposals["masks"],
        assignment,
        k,
        iou_threshold=cfg.match_iou,
        max_per_image=cfg.max_dets,
        backend=cfg.backend,
    )
    metrics = {**result.metrics, "params": {"evaluate": as_dict(cfg)}}
    metrics["clusters"] = {key: stores["clusters"].attrs[key] for key in ("K", "k_choice", "geometry")}
    write_json(METRICS, metrics)
    for row in ROWS:
        write_json(METRICS.parent / f"detections_{row}.json", result.detections[row])

    embeddings = stores["embeddings"]
    frequency = {int(c["id"]): c["frequency"] for c in gt.dataset["categories"]}
    names = {int(c["id"]): c["name"] for c in gt.dataset["categories"]}
    labels = result.matches.category
    bucket = np.array([frequency.get(int(c), "") for c in labels], dtype="<U1")
    points = disk_coordinates(store_array(embeddings, "embeddings"), float(embeddings.attrs["curvature"]))  # by blocks
    if embeddings.attrs["geometry"] != "poincare":  # Euclidean: squash into the disk for the picture only
        points = points / (1.0 + np.linalg.norm(points, axis=1, keepdims=True))
    with atomic_path(DISK_PNG) as tmp:
        poincare_disk(
            points,
            labels,
            bucket,
            names,
            read_array(stores["samples"], "pairs/hier"),
            tmp,
            title=f"{len(points)} {SPLIT} proposal embeddings ({embeddings.attrs['geometry']}, "
            f"d={embeddings.attrs['dim']}); norm kept, direction from the first two principal components",
        )
    with atomic_path(BARS_PNG) as tmp:
        bucket_ap_bars(result.metrics, tmp, title=f"LVIS mask AP on {SPLIT}, k = {k}")
    table = metrics_table(result.metrics)
    counts = result.metrics["counts"]
    print(table)
    print(json.dumps({"clustering": result.metrics["clustering"]["all"]}))
    summary(
        "evaluate",
        f"{counts['proposals']} proposals on {counts['images']} images, {counts['matched_proposals']} matched; "
        f"AP majority {result.metrics['majority']['AP']:.3f}, hungarian {result.metrics['hungarian']['AP']:.3f}, "
        f"oracle {result.metrics['oracle']['AP']:.3f} (scored by {cfg.backend}); wrote {METRICS}",
        timer,
    )


if __name__ == "__main__":
    typer.run(main)
