"""A tiny LVIS v1 world: 3 images, one category per frequency bucket, ground truth = the proposals' pasted masks.

The ground truth is made *from* the proposals (their M x M masks pasted with `paste_masks`), so submitting the
proposals with their true categories must score AP 1 exactly: torchvision's paste of a full box-sized mask
is not pixel-exactly the box rectangle, so drawing rectangles independently would not do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from pipeline.geometry.masks import encode_rle
from pipeline.geometry.paste import paste_masks

M = 28
HW = (128, 160)
CATEGORIES = [
    {"id": 1, "name": "rare_thing", "frequency": "r"},
    {"id": 2, "name": "common_thing", "frequency": "c"},
    {"id": 3, "name": "frequent_thing", "frequency": "f"},
]
# per image: (box xyxy, category id or 0 for a background proposal, score, shape)
LAYOUT = {
    11: [
        ((5, 5, 60, 60), 3, 0.90, "rect"),
        ((80, 10, 100, 30), 2, 0.80, "rect"),
        ((100, 70, 150, 120), 3, 0.70, "ellipse"),
        ((10, 100, 30, 120), 0, 0.10, "rect"),
    ],
    12: [
        ((10, 10, 120, 110), 1, 0.95, "rect"),
        ((130, 10, 155, 40), 3, 0.60, "rect"),
    ],
    13: [
        ((20, 20, 70, 70), 2, 0.85, "ellipse"),
        ((90, 80, 110, 100), 1, 0.50, "rect"),
    ],
}
IMAGE_META = {
    11: {"neg_category_ids": [1], "not_exhaustive_category_ids": []},
    12: {"neg_category_ids": [2], "not_exhaustive_category_ids": [3]},
    13: {"neg_category_ids": [3], "not_exhaustive_category_ids": []},
}


def _shape(kind: str) -> np.ndarray:
    if kind == "rect":
        return np.full((M, M), 255, dtype=np.uint8)
    yy, xx = np.mgrid[0:M, 0:M] + 0.5
    inside = ((yy - M / 2) / (M / 2)) ** 2 + ((xx - M / 2) / (M / 2)) ** 2 <= 1.0
    return (inside * 255).astype(np.uint8)


@dataclass
class TinyWorld:
    gt_json: Path
    image_ids: np.ndarray
    image_hw: np.ndarray
    image_offsets: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    category: np.ndarray  # true category per proposal, -1 for background

    @property
    def category_assignment(self) -> np.ndarray:
        """Cluster = category index (cat id - 1); background proposals go to cluster 0."""
        return np.maximum(self.category - 1, 0)


@pytest.fixture
def tiny_world(tmp_path: Path) -> TinyWorld:
    images, annotations = [], []
    boxes, scores, masks, category, offsets = [], [], [], [], [0]
    for image_id, items in LAYOUT.items():
        images.append({"id": image_id, "height": HW[0], "width": HW[1], **IMAGE_META[image_id]})
        img_boxes = np.array([b for b, _, _, _ in items], dtype=np.float32)
        img_masks = np.stack([_shape(kind) for _, _, _, kind in items])
        pasted = paste_masks(img_masks, img_boxes, HW)
        for (_, cat, score, _), box, mask, full in zip(items, img_boxes, img_masks, pasted, strict=True):
            boxes.append(box)
            masks.append(mask)
            scores.append(score)
            category.append(cat if cat else -1)
            if cat:
                rle = encode_rle(full)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat,
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    }
                )
        offsets.append(offsets[-1] + len(items))
    gt_json = tmp_path / "lvis_tiny.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return TinyWorld(
        gt_json=gt_json,
        image_ids=np.array(list(LAYOUT), dtype=np.int64),
        image_hw=np.array([HW] * len(LAYOUT), dtype=np.int64),
        image_offsets=np.array(offsets, dtype=np.int64),
        boxes=np.stack(boxes),
        scores=np.array(scores, dtype=np.float32),
        masks=np.stack(masks),
        category=np.array(category, dtype=np.int64),
    )
