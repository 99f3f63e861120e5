"""Unit tests of `pipeline.data.annotation_fields`: each check passes what pycocotools writes and real files hold,
and names what is wrong otherwise; the compressed-RLE reader agrees with pycocotools' encoder."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from pipeline.data.annotation_fields import (
    annotation_problem,
    category_problem,
    compressed_rle_counts,
    image_problem,
    segmentation_problem,
    short_polygon_count,
)

H, W = 6, 8


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros, the layout of COCO's RLE."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def test_compressed_rle_counts_match_pycocotools() -> None:
    """Small random masks (runs of one or two characters) and large ones of a few rectangles (runs of three to
    five characters, negative differences)."""
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        masks.append(rng.random((h, w)) < rng.random())
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(300, 2500, size=2))
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(1, 6))):
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            mask[y : y + int(rng.integers(1, h)), x : x + int(rng.integers(1, w))] = True
        masks.append(mask)
    for mask in masks:
        h, w = mask.shape
        mask = np.asfortranarray(mask, dtype=np.uint8)
        text = mask_utils.encode(mask)["counts"].decode()
        assert compressed_rle_counts(text) == _runs(mask)
        assert segmentation_problem({"counts": text, "size": [h, w]}, h, w) is None


@pytest.mark.parametrize("text", ["abc", "PPYo1", "0P", "", "~~~"])
def test_garbage_compressed_rle_is_a_problem(text: str) -> None:
    """pycocotools decodes some of these into uninitialised memory without an error ('' among them)."""
    assert "compressed RLE" in segmentation_problem({"counts": text, "size": [H, W]}, H, W)


def test_cut_compressed_rle_reads_as_none() -> None:
    assert compressed_rle_counts("P") is None  # 'P' = 0x20: a continued number with nothing after it
    assert compressed_rle_counts("\x7f") is None  # outside pycocotools' alphabet


def test_valid_records_pass() -> None:
    ann = {"bbox": [0, 0, 8, 6], "area": 48, "iscrowd": 1, "segmentation": {"counts": [0, 48], "size": [H, W]}}
    assert annotation_problem(ann, H, W) is None
    assert annotation_problem({"bbox": [0.5, 1, 0, 0], "iscrowd": True, "segmentation": []}, H, W) is None
    assert image_problem({"width": 640, "height": 480}) is None
    assert category_problem({"name": "aardvark", "synonyms": ["aardvark", "ant_bear"]}) is None
    assert category_problem({"name": "dog"}) is None


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"width": True, "height": 6}, "'width'"),
        ({"width": 8.0, "height": 6}, "'width'"),
        ({"width": 8, "height": -6}, "'height'"),
    ],
)
def test_image_problems(record: dict, expected: str) -> None:
    assert expected in image_problem(record)


@pytest.mark.parametrize(
    ("segmentation", "expected"),
    [
        ([[1, 1, 4, 1, float("inf"), 3]], "not finite"),
        ([[1, 1, 4, 1, 4, float("nan")]], "not finite"),
        ([[[1, 1], [4, 1], [4, 3]]], "numbers"),  # points as pairs: not the flat COCO layout
        ([[1, 1, 4, 1, 4, None]], "numbers"),
        ([[1, 1, 17, 1, 4, 3]], "far outside"),  # x > 2 W
        ([[1, -7, 4, 1, 4, 3]], "far outside"),  # y < -H
        ([{"x": 1}], "list of coordinates"),
        ({"counts": [0, 47], "size": [H, W]}, "add up to 47"),
        ({"counts": [0, -1, 49], "size": [H, W]}, "non-negative"),
        ({"counts": [48], "size": [W, H]}, "[height, width]"),
        ({"counts": [48], "size": "6x8"}, "'size'"),
        ({"size": [H, W]}, "'counts'"),
        ("polygon", "'segmentation'"),
    ],
)
def test_segmentation_problems(segmentation: object, expected: str) -> None:
    assert expected in segmentation_problem(segmentation, H, W)


def test_polygons_just_inside_the_margin_pass() -> None:
    assert segmentation_problem([[-W, -H, 2 * W, -H, 2 * W, 2 * H]], H, W) is None


def test_short_polygon_count() -> None:
    assert short_polygon_count([[1, 1, 4, 1, 4, 3], [1, 1, 4, 1], [1, 1, 4, 1, 4], []]) == 3
    assert short_polygon_count({"counts": [48], "size": [H, W]}) == 0


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        ({"bbox": [1, 1, 3]}, "'bbox'"),
        ({"bbox": (1, 1, 3, 2)}, "'bbox'"),
        ({"bbox": [1, 1, float("inf"), 2]}, "'bbox'"),
        ({"bbox": [1, 1, -3, 2]}, "negative"),
        ({"bbox": [1, 1, 3, 2], "area": "6"}, "'area'"),
        ({"bbox": [1, 1, 3, 2], "area": float("nan")}, "'area'"),
        ({"bbox": [1, 1, 3, 2], "iscrowd": "no"}, "'iscrowd'"),
        ({"bbox": [1, 1, 3, 2], "iscrowd": 2}, "'iscrowd'"),
        ({"bbox": [1, 1, 3, 2], "segmentation": [["1", "1", "4", "1", "4", "3"]]}, "'1'"),
    ],
)
def test_annotation_problems(annotation: dict, expected: str) -> None:
    assert expected in annotation_problem(annotation, H, W)


@pytest.mark.parametrize(
    ("category", "expected"),
    [
        ({"name": 7}, "'name'"),
        ({"name": ""}, "'name'"),
        ({"name": "dog", "synonyms": "hound"}, "'synonyms'"),
        ({"name": "dog", "synonyms": ["hound", 3]}, "'synonyms'"),
    ],
)
def test_category_problems(category: dict, expected: str) -> None:
    assert expected in category_problem(category)
