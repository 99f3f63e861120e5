"""Readers and validators for LVIS v1 / COCO instances files and their images, with one-line errors.

Every failure is a PipelineError whose message names the file (and the offending id or the JSON
line/column), so a stage can show it as a single line.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.annotation_fields import (
    annotation_problem,
    category_problem,
    image_problem,
    is_int,
    short_polygon_count,
)
from pipeline.data.annotation_stream import stream_items, top_level_value
from pipeline.errors import PipelineError

LVIS_FREQUENCIES = ("r", "c", "f")
_IMAGE_KEYS = ("id", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")


def load_json(path: Path, what: str) -> dict:
    """Parse a JSON object file; `what` says what the file is for ("LVIS annotations") in the error."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what}: {path}: file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise PipelineError(
            f"{what}: {path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except UnicodeDecodeError as err:
        raise PipelineError(f"{what}: {path}: not valid JSON (not UTF-8 text: {err.reason})") from None
    except OSError as err:
        raise PipelineError(f"{what}: {path}: cannot read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{what}: {path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


IMAGE_FIELDS = ("id", "width", "height", "file_name", "coco_url")  # what locating and sizing an image needs


def _require_list(value: object, key: str, path: Path, what: str) -> list:
    if value is _ABSENT:
        raise PipelineError(f"{what}: {path}: missing top-level key {key!r}")
    if not isinstance(value, list):
        raise PipelineError(f"{what}: {path}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _require_record(rec: object, i: int, keys: Sequence[str], kind: str, path: Path, what: str) -> dict:
    if not isinstance(rec, dict):
        raise PipelineError(f"{what}: {path}: {kind} #{i} is not an object")
    missing = [k for k in keys if k not in rec]
    if missing:
        ident = f"id {rec['id']}" if "id" in rec else f"#{i}"
        raise PipelineError(f"{what}: {path}: {kind} {ident} lacks {', '.join(repr(k) for k in missing)}")
    return rec


def _require_keys(records: Iterable[object], keys: Sequence[str], kind: str, path: Path, what: str) -> None:
    for i, rec in enumerate(records):
        _require_record(rec, i, keys, kind, path, what)


def _require_int_id(rec: dict, i: int, keys: Sequence[str], kind: str, path: Path, what: str) -> None:
    for key in keys:
        if not is_int(rec[key]):
            ident = f"id {rec['id']}" if key != "id" and is_int(rec["id"]) else f"#{i}"
            raise PipelineError(f"{what}: {path}: {kind} {ident}: {key!r} must be an integer, got {rec[key]!r}")


def _require_int_ids(records: list[dict], keys: Sequence[str], kind: str, path: Path, what: str) -> None:
    for i, rec in enumerate(records):
        _require_int_id(rec, i, keys, kind, path, what)


def _unique_ids(records: list[dict], kind: str, path: Path, what: str) -> set:
    ids: set = set()
    for rec in records:
        if rec["id"] in ids:
            raise PipelineError(f"{what}: {path}: duplicate {kind} id {rec['id']}")
        ids.add(rec["id"])
    return ids


@dataclass
class AnnotationFile:
    """What a validated file leaves in memory: its image and category records, the ids of the images that have
    annotations, and the number of annotations. The annotations themselves are only streamed."""

    path: Path
    images: list[dict]
    categories: list[dict]
    annotated_image_ids: np.ndarray  # sorted, unique
    n_annotations: int
    n_short_polygons: int = 0  # non-crowd annotations with a short polygon (COCO only; an LVIS file is refused)


_ABSENT = object()


def _validate(
    path: Path,
    what: str,
    image_keys: Sequence[str],
    cat_keys: Sequence[str],
    ann_keys: Sequence[str],
    allow_short_polygons: bool = False,
) -> AnnotationFile:
    """Check a COCO/LVIS file in three streamed passes (images, categories, annotations): record keys, integer
    ids, unique ids, an image file reference, annotations whose category and image exist, and the fields of
    every record (`pipeline.data.annotation_fields`). Polygons under three points are an error, or are counted
    with `allow_short_polygons` (the proposer's loader drops them, as detectron2 does)."""
    path = Path(path)
    images = _require_list(top_level_value(path, what, "images", _ABSENT), "images", path, what)
    cats = _require_list(top_level_value(path, what, "categories", _ABSENT), "categories", path, what)
    _require_keys(images, image_keys, "image", path, what)
    _require_keys(cats, cat_keys, "category", path, what)
    _require_int_ids(images, ("id",), "image", path, what)
    _require_int_ids(cats, ("id",), "category", path, what)
    for im in images:
        problem = image_problem(im)
        if problem:
            raise PipelineError(f"{what}: {path}: image id {im['id']}: {problem}")
        if "file_name" not in im and "coco_url" not in im:
            raise PipelineError(f"{what}: {path}: image id {im['id']} has neither 'file_name' nor 'coco_url'")
        try:
            image_path(im, Path("."))  # a file_name and coco_url of the right type, a coco_url with a folder
        except PipelineError as err:
            raise PipelineError(f"{what}: {path}: {err}") from None
    for cat in cats:
        problem = category_problem(cat)
        if problem:
            raise PipelineError(f"{what}: {path}: category id {cat['id']}: {problem}")
    _unique_ids(images, "image", path, what)
    cat_ids = _unique_ids(cats, "category", path, what)
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}  # (height, width) by image id
    ann_ids, ann_images = array("q"), array("q")
    n_short = 0
    for i, ann in enumerate(stream_items(path, what, "annotations.item")):
        _require_record(ann, i, ann_keys, "annotation", path, what)
        _require_int_id(ann, i, ("id", "image_id", "category_id"), "annotation", path, what)
        if ann["category_id"] not in cat_ids:
            raise PipelineError(
                f"{what}: {path}: annotation id {ann['id']} has unknown category_id {ann['category_id']}"
            )
        if ann["image_id"] not in sizes:
            raise PipelineError(f"{what}: {path}: annotation id {ann['id']} has unknown image_id {ann['image_id']}")
        problem = annotation_problem(ann, *sizes[ann["image_id"]])
        if problem:
            raise PipelineError(f"{what}: {path}: annotation id {ann['id']}: {problem}")
        segmentation = ann.get("segmentation")
        if short_polygon_count(segmentation):
            if not allow_short_polygons:
                raise PipelineError(
                    f"{what}: {path}: annotation id {ann['id']}: a polygon has fewer than three points "
                    "or an odd number of coordinates"
                )
            n_short += not ann.get("iscrowd", 0)  # training leaves crowds out anyway
        elif segmentation == [] and not allow_short_polygons:  # LVISEval fails on it inside pycocotools
            raise PipelineError(f"{what}: {path}: annotation id {ann['id']}: 'segmentation' holds no polygon")
        ann_ids.append(ann["id"])
        ann_images.append(ann["image_id"])
    if not ann_ids:  # an empty list, or no list at all: read the (small) value to tell
        _require_list(top_level_value(path, what, "annotations", _ABSENT), "annotations", path, what)
    ids = np.sort(np.frombuffer(ann_ids, dtype=np.int64))
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if repeated.size:
        raise PipelineError(f"{what}: {path}: duplicate annotation id {int(repeated[0])}")
    annotated = np.unique(np.frombuffer(ann_images, dtype=np.int64))
    return AnnotationFile(path, images, cats, annotated, len(ann_ids), n_short)


def validate_lvis(path: Path, what: str = "LVIS annotations") -> AnnotationFile:
    """Check an LVIS v1 file's structure, reading its annotations as a stream; returns its `AnnotationFile`.

    Checks: images/annotations/categories lists; image width/height and LVIS's neg_category_ids and
    not_exhaustive_category_ids (lists of known category ids); category name and frequency ('r'/'c'/'f');
    annotation segmentation/area/bbox; every annotation's category_id and image_id exist; ids unique; the fields
    of every record (`pipeline.data.annotation_fields`). A polygon under three points is an error, as it is for
    detectron2's and TFDS's LVIS loaders (both assert it never happens in LVIS v1).
    """
    path = Path(path)
    data = _validate(
        path,
        what,
        image_keys=(*_IMAGE_KEYS, "neg_category_ids", "not_exhaustive_category_ids"),
        cat_keys=("id", "name", "frequency"),
        ann_keys=(*_ANN_KEYS, "segmentation", "area"),
    )
    cat_ids = {c["id"] for c in data.categories}
    for cat in data.categories:
        if cat["frequency"] not in LVIS_FREQUENCIES:
            raise PipelineError(
                f"{what}: {path}: category id {cat['id']} has frequency {cat['frequency']!r} (expected r, c or f)"
            )
    for im in data.images:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(im[key], list):
                raise PipelineError(f"{what}: {path}: image id {im['id']}: {key!r} must be a list")
            unknown = [c for c in im[key] if not is_int(c) or c not in cat_ids]
            if unknown:
                raise PipelineError(f"{what}: {path}: image id {im['id']}: {key} has unknown category id {unknown[0]}")
    return data


def validate_coco(path: Path, what: str = "COCO annotations") -> AnnotationFile:
    """Check a COCO instances file's structure (ids unique, references resolve, fields typed), streaming its
    annotations; returns its `AnnotationFile`. Polygons under three points or of odd length are counted, not
    refused: the proposer's loader leaves them out, as detectron2's COCO loader does (which warns, where its LVIS
    loader asserts)."""
    return _validate(
        Path(path),
        what,
        image_keys=_IMAGE_KEYS,
        cat_keys=("id", "name"),
        ann_keys=(*_ANN_KEYS, "segmentation"),
        allow_short_polygons=True,
    )


def image_path(image: dict, image_root: Path) -> Path:
    """Where an image record's file lives under image_root.

    root/file_name when the record has a file_name: the synthetic world ("train/000001.png" under
    data/prepared/world/images) and COCO 2017 ("000000397133.jpg"; the caller passes the COCO image
    folder, <coco>/train2017, as the root). Otherwise root/<folder>/<file>, the last two components
    of coco_url's path: real LVIS v1 ("http://images.cocodataset.org/train2017/000000391895.jpg" ->
    root/train2017/000000391895.jpg; LVIS v1 val mixes train2017 and val2017 images).
    """
    root = Path(image_root)
    name, url = image.get("file_name"), image.get("coco_url")
    for key, value in (("file_name", name), ("coco_url", url)):
        if value is not None and not isinstance(value, str):
            raise PipelineError(f"image id {image.get('id')}: {key!r} must be a string, got {value!r}")
    if name:
        return root / name
    if not url:
        raise PipelineError(f"image id {image.get('id')}: record has neither 'file_name' nor 'coco_url'")
    parts = [p for p in urlsplit(url).path.replace("\\", "/").split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts[-2:]):
        raise PipelineError(f"image id {image.get('id')}: coco_url {url!r} does not end in <folder>/<file>")
    return root / parts[-2] / parts[-1]


def _shown(path: Path, root: Path) -> str:
    """`path` relative to `root` when it lies under it (for messages that also name the root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sample(n: int, sample: int, seed: int) -> np.ndarray:
    k = min(sample, n)
    return np.sort(np.random.Generator(np.random.PCG64(seed)).choice(n, size=k, replace=False))


def check_sampled_images(
    images: Sequence[dict], image_root: Path, what: str, source: Path, sample: int = 50, seed: int = 0
) -> int:
    """Check a seeded sample of an annotation file's images: present, readable, and of the recorded size.

    `what source` names the annotation file in the one-line error ("COCO annotations /x/instances_train2017.json:
    image 000000000009.jpg not found under /x/train2017 (3 of 50 sampled images missing)"); image paths are
    resolved with `image_path` under image_root. Every missing file of the sample is counted before the first is
    reported; then each present one is decoded and its width x height compared with the record's (a JPEG of
    the wrong size is the classic mismatch between an annotation file and an image folder). Returns how many
    images were checked.
    """
    root = Path(image_root)
    head = f"{what} {source}"
    if not root.is_dir():
        raise PipelineError(f"{head}: image folder {root} not found")
    n = len(images)
    if n == 0:
        return 0
    idx = _sample(n, sample, seed)
    paths = [image_path(images[i], root) for i in idx]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise PipelineError(
            f"{head}: image {_shown(missing[0], root)} not found under {root} "
            f"({len(missing)} of {len(idx)} sampled images missing)"
        )
    for i, path in zip(idx, paths, strict=True):
        record = images[i]
        try:
            with Image.open(path) as im:
                size = im.size
                im.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            detail = " ".join(str(err).split()) or type(err).__name__
            raise PipelineError(f"{head}: image {_shown(path, root)} under {root} cannot be read ({detail})") from None
        expected = (record.get("width"), record.get("height"))
        if size != expected:
            raise PipelineError(
                f"{head}: image {_shown(path, root)} under {root} is {size[0]}x{size[1]} pixels "
                f"but image id {record.get('id')} says {expected[0]}x{expected[1]}"
            )
    return len(idx)


def excluded_image_ids(held_out: Iterable[dict], training: Iterable[dict]) -> list[int]:
    """Sorted ids of the `training` images that are also `held_out` images (LVIS v1 ids are COCO ids).

    LVIS v1 val draws images from COCO train2017 too, so a proposer trained on COCO train2017 must leave these
    out, or val is scored on images the proposer was trained on.
    """
    held = {int(im["id"]) for im in held_out}
    return sorted({int(im["id"]) for im in training} & held)


def load_image(path: Path) -> np.ndarray:
    """An image file as a uint8 (H, W, 3) RGB array."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PipelineError(f"cannot read image {path}: {err}") from None
