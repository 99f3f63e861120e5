"""Unit tests of `pipeline.data.dataset`: LVIS categories matched to COCO's by name."""

from __future__ import annotations

from pipeline.data.dataset import base_categories_by_name
from tests.data.lvis_files import (
    BASE_IDS,
    COCO_CATEGORIES,
    LVIS_CATEGORIES,
)

# ---------------------------------------------------------------------------------------------
# base categories


def test_base_categories_by_name() -> None:
    assert base_categories_by_name(LVIS_CATEGORIES, COCO_CATEGORIES) == BASE_IDS


def test_base_categories_normalisation() -> None:
    lvis = [
        {"id": 5, "name": "Traffic-Light", "frequency": "f"},  # no synonyms key at all
        {"id": 4, "name": "hot_dog", "synonyms": [], "frequency": "c"},
        {"id": 9, "name": "teddy_bear", "synonyms": ["teddy"], "frequency": "c"},
        {"id": 6, "name": "trafficlight", "synonyms": [], "frequency": "r"},  # no separator: no match
    ]
    coco = [{"id": 1, "name": "traffic light"}, {"id": 2, "name": "hot dog"}, {"id": 3, "name": "teddy bear"}]
    assert base_categories_by_name(lvis, coco) == [4, 5, 9]  # sorted ids
    assert base_categories_by_name(lvis, []) == []
