"""Fixtures shared by the test modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

SIZE = 64


@pytest.fixture(scope="module")
def proposer_world(tmp_path_factory) -> tuple[Path, Path]:
    """Six 64 px noise images, each with two flat-coloured rectangles (one polygon, one RLE), COCO json."""
    root = tmp_path_factory.mktemp("world")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(6):
        pixels = (rng.integers(0, 80, (SIZE, SIZE, 3))).astype(np.uint8)
        for j in range(2):
            w, h = (int(v) for v in rng.integers(14, 28, 2))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            pixels[y : y + h, x : x + w] = (230, 200 - 120 * j, 40 + 150 * j)
            if j == 0:
                seg = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            else:
                mask = np.zeros((SIZE, SIZE), dtype=np.uint8, order="F")
                mask[y : y + h, x : x + w] = 1
                seg = mask_utils.encode(mask)
                seg["counts"] = seg["counts"].decode("ascii")
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": j + 1, "bbox": [x, y, w, h],
                 "area": w * h, "segmentation": seg, "iscrowd": 0}
            )  # fmt: skip
        Image.fromarray(pixels).save(root / "train" / f"{i:06d}.png")
        images.append({"id": i + 1, "file_name": f"train/{i:06d}.png", "height": SIZE, "width": SIZE})
    images.append({"id": 99, "file_name": "train/000000.png", "height": SIZE, "width": SIZE})  # no annotations
    anns.append({"id": 100, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 5], "segmentation": [], "iscrowd": 0})
    anns.append({"id": 101, "image_id": 1, "category_id": 1, "bbox": [3, 3, 9, 9], "segmentation": [], "iscrowd": 1})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = root / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, root
