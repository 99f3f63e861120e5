"""The supervised baseline's scoring path: a detector that returns the ground truth scores AP = 1."""

import numpy as np
import pytest

from pipeline.evaluation.lvis_eval import load_lvis
from pipeline.models.supervised import category_labels, evaluate_detector


def test_category_labels_are_contiguous_in_id_order():
    assert category_labels([{"id": 30}, {"id": 4}, {"id": 7}]) == {4: 1, 7: 2, 30: 3}


def _detector_from(world, label_map: dict[int, int], images: list[dict]):
    """A fake detector that returns, for each image, its ground-truth proposals with their true class."""
    rows = {int(i): k for k, i in enumerate(world.image_ids)}
    queue = [rows[int(r["id"])] for r in images]

    def detect(batch: list[np.ndarray]) -> list[dict]:
        out = []
        for _ in batch:
            i = queue.pop(0)
            s, e = int(world.image_offsets[i]), int(world.image_offsets[i + 1])
            keep = s + np.flatnonzero(world.category[s:e] >= 0)
            out.append(
                {
                    "boxes": world.boxes[keep],
                    "scores": world.scores[keep],
                    "masks": world.masks[keep],
                    "labels": np.array([label_map[int(c)] for c in world.category[keep]], dtype=np.int64),
                }
            )
        return out

    return detect


@pytest.mark.parametrize("batch_size", [1, 2])
def test_ground_truth_as_detections_scores_ap_one(tiny_world, batch_size):
    gt = load_lvis(tiny_world.gt_json)
    images = sorted(gt.dataset["images"], key=lambda r: r["id"])
    label_map = category_labels(gt.dataset["categories"])
    metrics, detections = evaluate_detector(
        gt,
        images,
        lambda record: np.zeros((record["height"], record["width"], 3), np.uint8),
        _detector_from(tiny_world, label_map, images),
        label_map,
        batch_size=batch_size,
        max_dets=300,
    )
    assert metrics["supervised"]["AP"] == pytest.approx(1.0)
    assert metrics["supervised"]["APr"] == pytest.approx(1.0)
    assert metrics["counts"]["detections"] == len(detections) == int((tiny_world.category >= 0).sum())
    assert {d["category_id"] for d in detections} == {1, 2, 3}
