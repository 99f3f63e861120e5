"""A tiny LVIS v1 + COCO 2017 dataset written in exactly the published layout, for tests.

    <base>/coco/train2017/*.jpg                         COCO train2017 images (LVIS train, part of LVIS val)
    <base>/coco/val2017/*.jpg                           COCO val2017 images (the rest of LVIS val)
    <base>/coco/annotations/instances_train2017.json    COCO instances: bare file_names, ids 1..90 with gaps
    <base>/lvis/lvis_v1_train.json                      LVIS v1: no file_name, coco_url says the folder
    <base>/lvis/lvis_v1_val.json                        LVIS v1 val: val2017 images and train2017 images

Images are JPEGs of mixed sizes: filled, coloured shapes (one colour per category) on a noise background,
drawn from exactly the polygons of the annotations; every object has one or two polygon parts. Some
LVIS val images come from train2017 and are in the COCO file too (the proposer must leave them out);
some images have no annotation at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

URL = "http://images.cocodataset.org"

COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 10, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 44, "name": "bottle", "supercategory": "kitchen"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
    {"id": 77, "name": "cell phone", "supercategory": "electronic"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},  # in COCO, not in this tiny LVIS
]


@dataclass(frozen=True)
class Cat:
    id: int
    name: str
    synonyms: tuple[str, ...]
    frequency: str
    coco_id: int | None  # the COCO category of the same object, None for the long tail
    colour: tuple[int, int, int]
    shape: str  # rect | ellipse | triangle


CATEGORIES = [
    Cat(3, "aerosol_can", ("aerosol_can", "spray_can"), "c", None, (230, 140, 20), "rect"),
    Cat(12, "aardvark", ("aardvark",), "r", None, (150, 60, 200), "ellipse"),
    Cat(76, "bottle", ("bottle",), "f", 44, (30, 160, 230), "rect"),
    Cat(
        207, "cellular_telephone", ("cellular_telephone", "cell_phone", "mobile_phone"), "f", 77, (250, 250, 40), "rect"
    ),
    Cat(232, "chair", ("chair",), "f", 62, (200, 40, 40), "triangle"),
    Cat(378, "dog", ("dog",), "f", 18, (40, 200, 60), "ellipse"),
    Cat(421, "gargoyle", ("gargoyle",), "r", None, (20, 20, 20), "triangle"),
    Cat(
        793,
        "person",
        ("person", "baby", "child", "boy", "girl", "man", "woman", "human"),
        "f",
        1,
        (240, 120, 200),
        "ellipse",
    ),
    Cat(1112, "traffic_light", ("traffic_light", "stoplight"), "c", 10, (250, 250, 250), "rect"),
    Cat(1150, "banjo", ("banjo",), "r", None, (110, 70, 20), "ellipse"),
]
BASE_IDS = sorted(c.id for c in CATEGORIES if c.coco_id is not None)  # matched by name or synonym

# COCO train2017 ids: 16 LVIS train images, 3 LVIS val images, 3 only in the COCO file
TRAIN2017 = [9, 25, 30, 34, 36, 42, 49, 61, 64, 71, 72, 73, 74, 77, 78, 81, 86, 89, 92, 94, 109, 110]
LVIS_TRAIN = TRAIN2017[:16]
VAL_FROM_TRAIN2017 = TRAIN2017[16:19]  # in LVIS v1 val and in instances_train2017.json: left out of training
VAL2017 = [139, 285, 632, 724, 776]
LVIS_VAL = sorted(VAL2017 + VAL_FROM_TRAIN2017)
EMPTY = {25, 632}  # no annotation at all
SIZES = [(64, 64), (96, 64), (64, 96), (80, 72), (96, 96), (72, 80)]  # (width, height)


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ellipse(x0: float, y0: float, x1: float, y1: float, n: int = 16) -> list[float]:
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        points += [round(cx + rx * math.cos(t), 2), round(cy + ry * math.sin(t), 2)]
    return points


def _triangle(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [(x0 + x1) / 2, y0, x1, y1, x0, y1]


SHAPES = {"rect": _rect, "ellipse": _ellipse, "triangle": _triangle}


def _parts(cat: Cat, box: tuple[int, int, int, int], two: bool) -> list[list[float]]:
    """The object's polygons: its shape, or its shape plus a detached small square (a second part)."""
    x0, y0, x1, y1 = box
    if not two:
        return [SHAPES[cat.shape](x0, y0, x1, y1)]
    split = x0 + (x1 - x0) * 0.65
    side = min(x1 - split - 2, (y1 - y0) * 0.4)
    return [SHAPES[cat.shape](x0, y0, split, y1), _rect(split + 2, y0, split + 2 + side, y0 + side)]


def _place(rng: np.random.Generator, width: int, height: int, n: int) -> list[tuple[int, int, int, int]]:
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(50):
        if len(boxes) == n:
            break
        w, h = int(rng.integers(18, 46)), int(rng.integers(16, 44))
        x0, y0 = int(rng.integers(2, width - w - 2)), int(rng.integers(2, height - h - 2))
        box = (x0, y0, x0 + w, y0 + h)
        if all(box[2] + 3 < b[0] or b[2] + 3 < box[0] or box[3] + 3 < b[1] or b[3] + 3 < box[1] for b in boxes):
            boxes.append(box)
    return boxes


def _render(image_id: int, size: tuple[int, int], objects: list[tuple[Cat, list[list[float]]]], path: Path) -> None:
    rng = np.random.default_rng(image_id)
    width, height = size
    noise = np.clip(rng.normal(118, 22, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(noise, mode="RGB")
    draw = ImageDraw.Draw(image)
    for cat, parts in objects:
        for poly in parts:
            draw.polygon(list(zip(poly[::2], poly[1::2], strict=True)), fill=cat.colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=92)


def _area_and_bbox(parts: list[list[float]], width: int, height: int) -> tuple[float, list[float]]:
    """COCO's area (of the polygons' rasterised mask, as pycocotools computes it) and the polygons' xywh box."""
    area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(parts, height, width))))
    xs = [x for poly in parts for x in poly[::2]]
    ys = [y for poly in parts for y in poly[1::2]]
    return area, [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


def _dump(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_real_layout(base: Path) -> dict:
    """Write the dataset under `base`; returns its paths and what a correct `prepare` must find."""
    base = Path(base)
    coco_root = base / "coco"
    order = [int(i) for i in np.random.default_rng(0).permutation(len(CATEGORIES))]
    turn = 0
    scenes: dict[int, tuple[tuple[int, int], list[tuple[Cat, list[list[float]]]]]] = {}
    for image_id in LVIS_VAL + [i for i in TRAIN2017 if i not in LVIS_VAL]:  # val first: it sees every category
        rng = np.random.default_rng(1000 + image_id)
        size = SIZES[image_id % len(SIZES)]
        n = 0 if image_id in EMPTY else int(rng.integers(1, 4))
        objects = []
        for k, box in enumerate(_place(rng, *size, n)):
            cat = CATEGORIES[order[turn % len(CATEGORIES)]]  # round robin: every category in every split
            turn += 1
            objects.append((cat, _parts(cat, box, two=(image_id + k) % 2 == 0)))
        folder = "val2017" if image_id in VAL2017 else "train2017"
        _render(image_id, size, objects, coco_root / folder / f"{image_id:012d}.jpg")
        scenes[image_id] = (size, objects)

    def image_record(image_id: int, lvis: bool) -> dict:
        (width, height), objects = scenes[image_id]
        folder = "val2017" if image_id in VAL2017 else "train2017"
        record = {
            "id": image_id,
            "width": width,
            "height": height,
            "license": 1,
            "coco_url": f"{URL}/{folder}/{image_id:012d}.jpg",
            "flickr_url": f"http://farm1.staticflickr.com/1/{image_id}_x.jpg",
            "date_captured": "2013-11-14 16:28:13",
        }
        if not lvis:
            return {**record, "file_name": f"{image_id:012d}.jpg"}  # COCO 2017: bare file_name
        present = sorted({c.id for c, _ in objects})
        absent = [c.id for c in CATEGORIES if c.id not in present]
        record["neg_category_ids"] = absent[image_id % 3 : image_id % 3 + 2]
        record["not_exhaustive_category_ids"] = present[:1] if image_id % 4 == 1 else []
        return record

    ann_id = {"lvis": 0, "coco": 0}

    def annotations(image_ids: list[int], kind: str) -> list[dict]:
        out = []
        for image_id in image_ids:
            (width, height), objects = scenes[image_id]
            for cat, parts in objects:
                if kind == "coco" and cat.coco_id is None:
                    continue
                area, bbox = _area_and_bbox(parts, width, height)
                ann_id[kind] += 1
                ann = {
                    "id": ann_id[kind] * 7 + 100,  # ids need not be contiguous either
                    "image_id": image_id,
                    "category_id": cat.coco_id if kind == "coco" else cat.id,
                    "segmentation": parts,
                    "area": area,
                    "bbox": bbox,
                }
                out.append({**ann, "iscrowd": 0} if kind == "coco" else ann)
        return out

    info = {"description": "tiny real-layout LVIS v1 / COCO 2017", "version": "1.0", "year": 2017}
    licenses = [{"id": 1, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"}]
    train_anns = annotations(LVIS_TRAIN, "lvis")
    lvis_categories = []
    for cat in CATEGORIES:
        mine = [a for a in train_anns if a["category_id"] == cat.id]
        lvis_categories.append(
            {
                "id": cat.id,
                "name": cat.name,
                "synonyms": list(cat.synonyms),
                "synset": f"{cat.name}.n.01",
                "def": f"a {cat.shape} of colour {cat.colour}",
                "frequency": cat.frequency,
                "image_count": len({a["image_id"] for a in mine}),
                "instance_count": len(mine),
            }
        )

    def lvis_file(image_ids: list[int], anns: list[dict]) -> dict:
        return {
            "info": info,
            "licenses": licenses,
            "images": [image_record(i, lvis=True) for i in image_ids],
            "annotations": anns,
            "categories": lvis_categories,
        }

    train_json = _dump(base / "lvis" / "lvis_v1_train.json", lvis_file(LVIS_TRAIN, train_anns))
    val_json = _dump(base / "lvis" / "lvis_v1_val.json", lvis_file(LVIS_VAL, annotations(LVIS_VAL, "lvis")))
    coco_anns = annotations(TRAIN2017, "coco")
    coco_json = _dump(
        coco_root / "annotations" / "instances_train2017.json",
        {
            "info": info,
            "licenses": licenses,
            "images": [image_record(i, lvis=False) for i in TRAIN2017],
            "annotations": coco_anns,
            "categories": COCO_CATEGORIES,
        },
    )
    annotated = {a["image_id"] for a in coco_anns}
    return {
        "train_json": train_json,
        "val_json": val_json,
        "coco_json": coco_json,
        "image_root": coco_root,
        "coco_image_root": coco_root / "train2017",
        "excluded_ids": sorted(VAL_FROM_TRAIN2017),
        "train_ids": sorted(LVIS_TRAIN),
        "val_ids": LVIS_VAL,
        "base_ids": BASE_IDS,
        # the proposer trains on the COCO images with an annotation, LVIS val images left out
        "proposer_images": len(annotated - set(VAL_FROM_TRAIN2017)),
        "proposer_images_unexcluded": len(annotated),
    }
