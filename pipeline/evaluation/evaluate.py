"""The whole evaluation protocol (DESIGN.md, "Evaluation protocol") for one clustering of one split's proposals.

1. paste every proposal's mask at full resolution (compressed RLE) and match it to the ground truth once;
2. the cluster x category count matrix, and from it the `majority` and `hungarian` cluster -> category maps;
3. detections for `majority`, `hungarian` and `oracle` (matched proposals with their own category), each
   scored as LVIS mask AP (segm) by the chosen backend: faster-coco-eval (LVIS mode) or LVISEval;
4. NMI / ARI / purity on matched proposals, overall and per frequency bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.cluster_maps import count_matrix, hungarian_map, majority_map
from pipeline.evaluation.clustering_metrics import clustering_metrics
from pipeline.evaluation.detections import (
    build_detections,
    check_offsets,
    cluster_detections,
    proposal_rles,
)
from pipeline.evaluation.lvis_eval import BACKENDS, METRIC_KEYS, check_lvis, load_lvis, run_lvis_eval
from pipeline.evaluation.matching import Matches, match_proposals

if TYPE_CHECKING:
    from lvis import LVIS

ROWS = ("majority", "hungarian", "oracle")


@dataclass
class ClusterEvaluation:
    """`metrics` is JSON-ready (floats, ints, None); `detections[row]` is the LVIS results list that was scored."""

    metrics: dict
    detections: dict[str, list[dict]]
    mappings: dict[str, dict[int, int]]
    matches: Matches


def evaluate_clusters(
    gt_json: Path | str | LVIS,
    image_ids: Sequence[int],
    image_hw: np.ndarray,
    image_offsets: np.ndarray,
    boxes: np.ndarray,  # or any array-like read by row ranges (a zarr array)
    scores: np.ndarray,
    masks: np.ndarray,  # likewise: read in blocks of images, never whole
    assignment: np.ndarray,
    k: int,
    *,
    iou_threshold: float = 0.5,
    max_per_image: int = 300,
    backend: str = BACKENDS[0],
    progress: bool = True,
) -> ClusterEvaluation:
    """Score a clustering of proposals against an LVIS-format ground truth, restricted to `image_ids`.

    `backend` scores the detections: "faster_coco_eval" or "lvis" (LVISEval), the same numbers (lvis_eval.py).

    metrics = {"majority": {AP...}, "hungarian": {AP...}, "oracle": {AP...},
               "clustering": {"all"|"r"|"c"|"f": {nmi, ari, purity, n}}, "counts": {...}}
    """
    image_ids = [int(i) for i in np.asarray(image_ids)]
    image_hw = np.asarray(image_hw, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64)
    assignment = np.asarray(assignment, dtype=np.int64)
    n = len(scores)
    if len(image_hw) != len(image_ids):
        raise PipelineError(f"{len(image_hw)} image sizes for {len(image_ids)} images")
    offsets = check_offsets(image_offsets, len(image_ids), n)
    n_boxes, n_masks = int(np.shape(boxes)[0]), int(np.shape(masks)[0])  # zarr arrays have a shape, not a len
    if n_boxes != n or n_masks != n or len(assignment) != n:
        raise PipelineError(
            f"{n_boxes} boxes, {n_masks} masks, {n} scores and {len(assignment)} assignments do not match"
        )
    if k < 1 or (n and (assignment.min() < 0 or assignment.max() >= k)):
        raise PipelineError(f"cluster assignments must lie in [0, k={k})")

    if isinstance(gt_json, str | Path):
        gt = load_lvis(gt_json)
    else:
        gt = gt_json
        check_lvis(gt)
    for image_id, (h, w) in zip(image_ids, image_hw, strict=True):
        img = gt.imgs.get(image_id)
        if img is None:
            raise PipelineError(f"image {image_id} is not in the ground truth")
        if (img["height"], img["width"]) != (h, w):
            raise PipelineError(
                f"image {image_id} is {h}x{w} in the proposals but {img['height']}x{img['width']} in the ground truth"
            )

    rles = proposal_rles(offsets, boxes, masks, image_hw, progress=progress)
    per_image = [rles[offsets[i] : offsets[i + 1]] for i in range(len(image_ids))]
    gt_per_image = [gt.img_ann_map[image_id] for image_id in image_ids]
    matches = match_proposals(per_image, gt_per_image, image_hw, iou_threshold, progress=progress)

    category_ids = sorted(gt.get_cat_ids())
    counts = count_matrix(assignment, matches.category, k, category_ids)
    mappings = {"majority": majority_map(counts, category_ids), "hungarian": hungarian_map(counts, category_ids)}

    detections = {
        row: cluster_detections(
            image_ids, offsets, scores, rles, assignment, mappings[row], max_per_image=max_per_image
        )
        for row in ("majority", "hungarian")
    }
    detections["oracle"] = build_detections(
        image_ids, offsets, scores, rles, matches.category, max_per_image=max_per_image
    )

    metrics: dict = {
        row: run_lvis_eval(gt, detections[row], max_dets=max_per_image, image_ids=image_ids, backend=backend)
        for row in ROWS
    }
    frequency = {int(cat["id"]): cat["frequency"] for cat in gt.dataset["categories"]}
    metrics["clustering"] = clustering_metrics(assignment, matches.category, frequency)
    n_matched = int(matches.matched.sum())
    cluster_sizes = np.bincount(assignment, minlength=k)
    column = {cat: i for i, cat in enumerate(category_ids)}
    metrics["counts"] = {
        "images": len(image_ids),
        "proposals": n,
        "matched_proposals": n_matched,
        "matched_fraction": n_matched / n if n else None,
        "gt_instances": sum(len(anns) for anns in gt_per_image),
        "gt_instances_matched": int(len(np.unique(matches.ann_id[matches.matched]))),
        "categories_matched": int(len(np.unique(matches.category[matches.matched]))),
        "clusters": int(k),
        "clusters_nonempty": int((cluster_sizes > 0).sum()),
        "clusters_with_matches": int((counts.sum(axis=1) > 0).sum()),
        "majority_clusters_mapped": len(mappings["majority"]),
        "majority_categories_covered": len(set(mappings["majority"].values())),
        "hungarian_pairs": len(mappings["hungarian"]),
        "hungarian_matched_proposals": int(sum(counts[c, column[cat]] for c, cat in mappings["hungarian"].items())),
        **{f"detections_{row}": len(detections[row]) for row in ROWS},
    }
    return ClusterEvaluation(metrics=metrics, detections=detections, mappings=mappings, matches=matches)


def metrics_table(metrics: dict) -> str:
    """The AP rows of `metrics` as a Markdown table (what `make repro` prints and the README shows)."""
    head = "| protocol | " + " | ".join(METRIC_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(METRIC_KEYS) + 1)]
    for row in ROWS:
        values = [metrics[row].get(k) for k in METRIC_KEYS]
        lines.append(f"| {row} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)
