"""Tiny hand-made LVIS v1 / COCO 2017 files and images for the real-data tests (tests/data/test_lvis_format.py,
tests/data/test_dataset.py, tests/test_prepare_stage.py): two LVIS train and two val images (one val image also in
COCO train2017, as in LVIS v1), three categories, and the checks of a one-line error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Data, LvisData, Params


def annotation(ann_id: int, image_id: int, category_id: int) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [1.0, 1.0, 3.0, 2.0],
        "area": 6.0,
        "segmentation": [[1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]],
    }


LVIS_CATEGORIES = [
    {"id": 1, "name": "traffic_light", "synonyms": ["traffic_light", "stoplight"], "frequency": "f"},
    {"id": 2, "name": "human", "synonyms": ["human", "person"], "frequency": "c"},
    {"id": 3, "name": "aardvark", "synonyms": ["aardvark"], "frequency": "r"},
]
BASE_IDS = [1, 2]  # traffic_light ~ 'traffic light'; human via its synonym 'person'

COCO_CATEGORIES = [
    {"id": 10, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def lvis_train() -> dict:
    """Two images: one with a file_name (synthetic style), one with only a coco_url (real LVIS v1)."""
    return {
        "info": {"description": "tiny"},
        "images": [
            {
                "id": 1,
                "width": 8,
                "height": 6,
                "file_name": "train/000001.png",
                "neg_category_ids": [3],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 2,
                "width": 8,
                "height": 6,
                "coco_url": "http://images.cocodataset.org/train2017/000000000002.jpg",
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [1],
            },
        ],
        "annotations": [annotation(1, 1, 1), annotation(2, 2, 2), annotation(3, 2, 3)],
        "categories": copy.deepcopy(LVIS_CATEGORIES),
    }


def lvis_val() -> dict:
    """Two images, as in LVIS v1 val: one from COCO val2017, one from COCO train2017 (also in the COCO file)."""
    return {
        "images": [
            {
                "id": 139,
                "width": 8,
                "height": 6,
                "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 9,
                "width": 8,
                "height": 6,
                "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            },
        ],
        "annotations": [annotation(7, 139, 2), annotation(8, 9, 1)],
        "categories": copy.deepcopy(LVIS_CATEGORIES),
    }


EXCLUDED_IDS = [9]  # the LVIS val image the COCO file also holds


_BOX = [[1, 1, 4, 1, 4, 3, 1, 3]]


def coco_base() -> dict:
    """COCO 2017 instances: bare file_names under <image_root>/train2017; image 9 is an LVIS val image."""
    return {
        "images": [
            {"id": 2, "width": 8, "height": 6, "file_name": "000000000002.jpg"},
            {"id": 9, "width": 8, "height": 6, "file_name": "000000000009.jpg"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 2,
                "category_id": 10,
                "bbox": [1, 1, 3, 2],
                "area": 6,
                "iscrowd": 0,
                "segmentation": _BOX,
            },
            {
                "id": 2,
                "image_id": 9,
                "category_id": 1,
                "bbox": [1, 1, 3, 2],
                "area": 6,
                "iscrowd": 0,
                "segmentation": _BOX,
            },
        ],
        "categories": copy.deepcopy(COCO_CATEGORIES),
    }


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def write_image(path: Path, fmt: str = "PNG", mode: str = "RGB", size: tuple[int, int] = (8, 6)) -> Path:
    """A noise image of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    if mode == "L":
        Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8), mode="L").save(path, format=fmt)
    else:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def one_line(err: pytest.ExceptionInfo, *parts: object) -> str:
    """The error's message, checked to be a single non-empty line containing every part."""
    msg = str(err.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"multi-line message: {msg!r}"
    for part in parts:
        assert str(part) in msg, f"{part!r} not in {msg!r}"
    return msg


def lvis_params(dataset: dict[str, Path], coco_image_root: Path | None = None, **override: Path) -> Params:
    paths = {**dataset, **override}
    lvis = LvisData(
        train_json=str(paths["train"]),
        val_json=str(paths["val"]),
        image_root=str(paths["root"]),
        coco_json=str(paths["coco"]),
        coco_image_root=None if coco_image_root is None else str(coco_image_root),
    )
    return Params(data=Data(source="lvis", lvis=lvis))


def write_dataset(tmp_path: Path) -> dict[str, Path]:
    """The valid tiny LVIS train/val + COCO files and every image they reference."""
    root = tmp_path / "images"
    write_image(root / "train" / "000001.png")
    write_image(root / "train2017" / "000000000002.jpg", fmt="JPEG")
    write_image(root / "train2017" / "000000000009.jpg", fmt="JPEG")
    write_image(root / "val2017" / "000000000139.jpg", fmt="JPEG")
    return {
        "train": write_json(tmp_path / "ann" / "lvis_v1_train.json", lvis_train()),
        "val": write_json(tmp_path / "ann" / "lvis_v1_val.json", lvis_val()),
        "coco": write_json(tmp_path / "ann" / "instances_train2017.json", coco_base()),
        "root": root,
    }
