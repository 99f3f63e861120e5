"""The fully supervised baseline of the paper's Table 1: the same torchvision Mask R-CNN trained with every
category label of the train split, scored on val by the same LVISEval as the discovered clusters.

Category ids map to contiguous labels 1..C (0 is background) in sorted id order. Inference keeps up to
`max_dets` detections per image above `score_thresh` (0.05, detectron2's test default: AP needs the low
scores too), one per RoI with its best class, after class-agnostic NMS.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.evaluation.detections import build_detections, proposal_rles
from pipeline.evaluation.lvis_eval import run_lvis_eval
from pipeline.stores.store import offsets_from_counts

SCORE_THRESH = 0.05


def category_labels(categories: list[dict]) -> dict[int, int]:
    """Category id -> contiguous label 1..C, in sorted id order."""
    return {cat_id: i + 1 for i, cat_id in enumerate(sorted(int(c["id"]) for c in categories))}


def evaluate_detector(
    gt,
    images: list[dict],
    load_image: Callable[[dict], np.ndarray],
    detect: Callable[[list[np.ndarray]], list[dict]],
    label_map: dict[int, int],
    *,
    batch_size: int,
    max_dets: int,
    backend: str = "faster_coco_eval",
) -> tuple[dict, list[dict]]:
    """Run `detect` over `images` (LVIS records) and score its labelled masks as LVIS mask AP (segm), with
    `backend` ("faster_coco_eval" or "lvis": LVISEval; the same numbers, pipeline/evaluation/lvis_eval.py).

    Returns (metrics, detections): metrics as `run_lvis_eval` gives them, plus counts.
    """
    category_of = {label: cat_id for cat_id, label in label_map.items()}
    results: list[dict] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        results.extend(detect([load_image(record) for record in batch]))
    offsets = offsets_from_counts([len(r["scores"]) for r in results])
    hw = np.array([(r["height"], r["width"]) for r in images], dtype=np.int64)
    boxes = np.concatenate([r["boxes"] for r in results]) if results else np.zeros((0, 4), np.float32)
    masks = np.concatenate([r["masks"] for r in results]) if results else np.zeros((0, 28, 28), np.uint8)
    scores = np.concatenate([r["scores"] for r in results]) if results else np.zeros(0, np.float32)
    labels = np.concatenate([r["labels"] for r in results]) if results else np.zeros(0, np.int64)
    categories = np.array([category_of.get(int(label), -1) for label in labels], dtype=np.int64)
    rles = proposal_rles(offsets, boxes, masks, hw, progress=False)
    image_ids = [int(r["id"]) for r in images]
    detections = build_detections(image_ids, offsets, scores, rles, categories, max_per_image=max_dets)
    metrics = run_lvis_eval(gt, detections, max_dets=max_dets, image_ids=image_ids, backend=backend)
    metrics_out = {"supervised": metrics, "counts": {"images": len(images), "detections": len(detections)}}
    return metrics_out, detections
