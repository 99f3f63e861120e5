"""Streamed annotation files (pipeline.data.annotation_stream): items, top-level values, the on-disk index by
image, and that the stages' readers never parse a file whole on the valid path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import annotation_stream as stream
from pipeline.data.annotation_stream import AnnotationIndex, annotations_of, load_image_records, top_level_value
from pipeline.data.lvis_format import load_json, validate_coco, validate_lvis
from pipeline.errors import PipelineError


def _file(tmp_path: Path, n_images: int = 30, n_anns: int = 200, seed: int = 0) -> tuple[Path, dict]:
    rng = np.random.default_rng(seed)
    ids = range(1, n_images + 1)
    images = [{"id": i, "width": 10, "height": 8, "file_name": f"{i}.jpg", "license": 3} for i in ids]
    anns = [
        {
            "id": j + 1,
            "image_id": int(rng.integers(1, n_images + 1)),
            "category_id": int(rng.integers(1, 4)),
            "bbox": [1.0, 1.0, 3.5, 2.0],
            "segmentation": [[1.0, 1.0, 4.5, 1.0, 4.5, 3.0]] * int(rng.integers(1, 3)),
            "area": 4.0,
            "iscrowd": int(j % 17 == 0),
        }
        for j in range(n_anns)
    ]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    data = {"info": {}, "images": images, "annotations": anns, "categories": cats}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


def _grouped(data: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann)
    return out


def test_index_groups_by_image_in_file_order(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    index = AnnotationIndex(path, "COCO annotations")
    expected = _grouped(data)
    assert len(index) == len(data["annotations"])
    assert index.image_ids().tolist() == sorted(expected)
    for image in data["images"]:
        assert index[image["id"]] == expected.get(image["id"], [])
        assert index.count(image["id"]) == len(expected.get(image["id"], []))
    assert index[12345] == []


def test_index_keeps_what_keep_returns(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    index = AnnotationIndex(path, "x", lambda a: None if a["iscrowd"] else (a["id"], a["category_id"]), folder=tmp_path)
    for image_id, anns in _grouped(data).items():
        assert index[image_id] == [(a["id"], a["category_id"]) for a in anns if not a["iscrowd"]]
    assert len(index) == sum(not a["iscrowd"] for a in data["annotations"])
    assert list(tmp_path.iterdir()) == [path]  # the index file is unlinked from the start


class _Reader(torch.utils.data.Dataset):
    def __init__(self, index: AnnotationIndex, ids: list[int]) -> None:
        self.index, self.ids = index, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> list[int]:
        return [a["id"] for a in self.index[self.ids[i]]]


def test_index_is_read_by_forked_dataloader_workers(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    index = AnnotationIndex(path, "x")
    ids = [im["id"] for im in data["images"]]
    loader = torch.utils.data.DataLoader(_Reader(index, ids), batch_size=None, num_workers=2)
    expected = _grouped(data)
    assert list(loader) == [[a["id"] for a in expected.get(i, [])] for i in ids]


def test_top_level_values_and_records(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    assert top_level_value(path, "x", "categories") == data["categories"]
    assert top_level_value(path, "x", "licenses", None) is None
    with pytest.raises(PipelineError, match="missing top-level key 'licenses'"):
        top_level_value(path, "x", "licenses")
    assert load_image_records(path, "x") == data["images"]
    assert load_image_records(path, "x", ("id", "width")) == [{"id": im["id"], "width": 10} for im in data["images"]]
    picked = annotations_of(path, "x", [3, 4, 999])
    expected = _grouped(data)
    assert picked == {3: expected.get(3, []), 4: expected.get(4, []), 999: []}


def test_validation_streams_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The valid path never parses a file whole (json.load is the error path's, for the line and column)."""
    path, data = _file(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("parsed whole")

    monkeypatch.setattr(stream.json, "load", refuse)
    found = validate_coco(path)
    assert found.n_annotations == len(data["annotations"])
    assert found.annotated_image_ids.tolist() == sorted(_grouped(data))
    lvis = dict(data, images=[dict(im, neg_category_ids=[], not_exhaustive_category_ids=[2]) for im in data["images"]])
    lvis["categories"] = [dict(c, frequency="rcf"[i]) for i, c in enumerate(data["categories"])]
    lvis_path = tmp_path / "lvis.json"
    lvis_path.write_text(json.dumps(lvis))
    assert validate_lvis(lvis_path).images == lvis["images"]


def test_duplicate_annotation_id_found_across_the_stream(tmp_path: Path) -> None:
    path, data = _file(tmp_path)
    data["annotations"][150]["id"] = data["annotations"][3]["id"]
    path.write_text(json.dumps(data))
    with pytest.raises(PipelineError, match=f"duplicate annotation id {data['annotations'][3]['id']}$"):
        validate_coco(path)


def test_image_records_are_streamed_equal_to_the_parsed_file(tmp_path):
    data = {
        "info": {"year": 2017},
        "images": [
            {"id": 9, "width": 640, "height": 480, "coco_url": "http://x/train2017/000000000009.jpg", "f": 0.5},
            {"id": 139, "width": 427, "height": 640, "file_name": "000000000139.jpg", "neg_category_ids": [1, 2]},
        ],
        "annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [1.5, 2, 3, 4], "area": 12.25}],
        "categories": [{"id": 1, "name": "a", "frequency": "r"}],
    }
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(data))
    records = load_image_records(path, "LVIS annotations")
    assert records == load_json(path, "LVIS annotations")["images"]
    assert [type(r["id"]) for r in records] == [int, int] and type(records[0]["f"]) is float


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"images": [{"id": 1}', "not valid JSON"),
        ('{"images": [3, 4]}', "'images' must be a list of records"),
    ],
)
def test_image_records_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PipelineError, match=message) as err:
        load_image_records(path, "LVIS annotations")
    assert str(err.value).startswith(f"LVIS annotations: {path}: ") and "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="file not found"):
        load_image_records(tmp_path / "missing.json", "LVIS annotations")


def test_a_large_broken_file_is_not_parsed_whole_for_its_error(tmp_path, monkeypatch):
    """Above the size limit (here 0 bytes) the error names where the stream had read to instead of the line and
    column the standard parser would find by loading the whole file (several GB for LVIS train)."""
    path = tmp_path / "cut.json"
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(5000)]})[:-40_000])
    monkeypatch.setattr(stream, "_EXACT_ERROR_BYTES", 0)
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("parsed whole"))
    with pytest.raises(PipelineError, match=r"not valid JSON \(.*within the first [\d,]+ bytes\)") as err:
        load_image_records(path, "LVIS annotations")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ['{"annotations": []}', '{"images": {"id": 1}}', '{"images": null}'])
def test_a_file_without_an_images_list_is_an_error_not_an_empty_split(tmp_path, text):
    path = tmp_path / "no_images.json"
    path.write_text(text)
    with pytest.raises(PipelineError, match="'images' must be a list|missing top-level key 'images'"):
        load_image_records(path, "LVIS annotations")
    path.write_text('{"images": []}')
    assert load_image_records(path, "LVIS annotations") == []
