"""Unit tests of `pipeline.data.lvis_format` (validation, image paths, sampled image checks, image loading) on the
tiny hand-made LVIS v1 / COCO files of tests/data/lvis_files.py.

Every failure must be a PipelineError whose message is a single line naming the file (and the
offending id, or the JSON line/column, where there is one).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from pipeline.data.lvis_format import (
    check_sampled_images,
    excluded_image_ids,
    image_path,
    load_image,
    load_json,
    validate_coco,
    validate_lvis,
)
from pipeline.errors import PipelineError
from tests.data.lvis_files import (
    EXCLUDED_IDS,
    coco_base,
    lvis_train,
    lvis_val,
    one_line,
    write_dataset,
    write_image,
    write_json,
)


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    return write_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# valid files


def _summary_of(data: dict) -> tuple:
    anns = data["annotations"]
    return data["images"], data["categories"], sorted({a["image_id"] for a in anns}), len(anns)


def _summary(found) -> tuple:
    return found.images, found.categories, found.annotated_image_ids.tolist(), found.n_annotations


def test_valid_lvis_passes(dataset: dict[str, Path]) -> None:
    """Validation streams the annotations and keeps the image and category records, the annotated image ids
    and the annotation count."""
    assert _summary(validate_lvis(dataset["train"])) == _summary_of(lvis_train())
    assert _summary(validate_lvis(dataset["val"])) == _summary_of(lvis_val())


def test_valid_coco_passes(dataset: dict[str, Path]) -> None:
    assert _summary(validate_coco(dataset["coco"])) == _summary_of(coco_base())


def test_coco_file_fails_validate_lvis(tmp_path: Path) -> None:
    """A COCO file lacks LVIS-only keys (frequency, neg_category_ids), so validate_lvis rejects it."""
    path = write_json(tmp_path / "coco.json", coco_base())
    with pytest.raises(PipelineError) as err:
        validate_lvis(path)
    one_line(err, path)


def test_lvis_accepts_rle_segmentation(tmp_path: Path) -> None:
    """Compressed (string) and uncompressed (list) RLE of the image's size, as pycocotools writes them."""
    mask = np.zeros((6, 8), dtype=np.uint8, order="F")
    mask[1:3, 1:4] = 1
    data = lvis_train()
    data["annotations"][0]["segmentation"] = {"size": [6, 8], "counts": mask_utils.encode(mask)["counts"].decode()}
    data["annotations"][1]["segmentation"] = {"size": [6, 8], "counts": [8, 2, 4, 2, 4, 2, 26]}
    validate_lvis(write_json(tmp_path / "rle.json", data))


# ---------------------------------------------------------------------------------------------
# load_json errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "lvis_v1_train.json"
    for validate in (validate_lvis, validate_coco):
        with pytest.raises(PipelineError) as err:
            validate(path)
        one_line(err, path, "not found")


def test_corrupt_json_gives_line_and_column(tmp_path: Path) -> None:
    text = json.dumps(lvis_train(), indent=2)
    truncated = text[: len(text) // 2]
    path = tmp_path / "truncated.json"
    path.write_text(truncated)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(truncated)
    with pytest.raises(PipelineError) as err:
        validate_lvis(path)
    msg = one_line(err, path, "not valid JSON", f"line {ref.value.lineno}", f"column {ref.value.colno}")
    assert ref.value.lineno > 1, msg  # the truncation is well past the first line


def test_corrupt_json_in_coco(tmp_path: Path) -> None:
    path = tmp_path / "coco.json"
    path.write_text('{"images": [')
    with pytest.raises(PipelineError) as err:
        validate_coco(path)
    one_line(err, path, "line 1", "column 13")


def test_non_utf8_json(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(PipelineError) as err:
        validate_lvis(path)
    one_line(err, path, "UTF-8")


@pytest.mark.parametrize(("text", "kind"), [("[1, 2]", "list"), ('"hello"', "str"), ("3", "int"), ("null", "None")])
def test_top_level_not_an_object(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "top.json"
    path.write_text(text)
    with pytest.raises(PipelineError) as err:
        validate_lvis(path)
    one_line(err, path, "JSON object", kind)


def test_load_json_names_what(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as err:
        load_json(tmp_path / "x.json", "LVIS val annotations")
    one_line(err, "LVIS val annotations", tmp_path / "x.json")
    with pytest.raises(PipelineError) as err:
        validate_lvis(tmp_path / "x.json", what="my LVIS")
    one_line(err, "my LVIS")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as err:
        validate_lvis(tmp_path)
    one_line(err, tmp_path)


# ---------------------------------------------------------------------------------------------
# structural errors


def _del(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def _set_ann(field: str, value: object, i: int = 1) -> Callable[[dict], None]:
    return lambda d: d["annotations"][i].__setitem__(field, value)


def _dup(kind: str) -> Callable[[dict], None]:
    return lambda d: d[kind].append(copy.deepcopy(d[kind][0]))


def _del_image_key(key: str, i: int = 1) -> Callable[[dict], None]:
    return lambda d: d["images"][i].pop(key)


LVIS_ERRORS = {
    # name: (mutation, parts the one-line message must contain besides the path)
    "missing annotations": (_del("annotations"), ["missing top-level key", "'annotations'"]),
    "missing images": (_del("images"), ["'images'"]),
    "missing categories": (_del("categories"), ["'categories'"]),
    "annotations not a list": (lambda d: d.__setitem__("annotations", {}), ["'annotations'", "list", "dict"]),
    "unknown category_id": (_set_ann("category_id", 99), ["annotation id 2", "unknown category_id 99"]),
    "unknown image_id": (_set_ann("image_id", 77), ["annotation id 2", "unknown image_id 77"]),
    "duplicate image id": (_dup("images"), ["duplicate image id 1"]),
    "duplicate category id": (_dup("categories"), ["duplicate category id 1"]),
    "duplicate annotation id": (_dup("annotations"), ["duplicate annotation id 1"]),
    "frequency x": (
        lambda d: d["categories"][1].__setitem__("frequency", "x"),
        ["category id 2", "frequency 'x'"],
    ),
    "unknown neg_category_id": (
        lambda d: d["images"][1].__setitem__("neg_category_ids", [1, 42]),
        ["image id 2", "neg_category_ids", "unknown category id 42"],
    ),
    "unknown not_exhaustive id": (
        lambda d: d["images"][0].__setitem__("not_exhaustive_category_ids", [5]),
        ["image id 1", "not_exhaustive_category_ids", "unknown category id 5"],
    ),
    "neg_category_ids not a list": (
        lambda d: d["images"][0].__setitem__("neg_category_ids", 3),
        ["image id 1", "'neg_category_ids' must be a list"],
    ),
    "missing neg_category_ids": (_del_image_key("neg_category_ids"), ["image id 2", "lacks", "'neg_category_ids'"]),
    "missing width": (_del_image_key("width", 0), ["image id 1", "'width'"]),
    "image without file_name or coco_url": (_del_image_key("coco_url"), ["image id 2", "'file_name'", "'coco_url'"]),
    "image without id": (_del_image_key("id", 0), ["image #0", "'id'"]),
    "image not an object": (lambda d: d["images"].__setitem__(1, [1, 2]), ["image #1 is not an object"]),
    "category missing frequency": (
        lambda d: d["categories"][2].pop("frequency"),
        ["category id 3", "'frequency'"],
    ),
    "annotation missing bbox": (lambda d: d["annotations"][2].pop("bbox"), ["annotation id 3", "'bbox'"]),
    "annotation missing area": (lambda d: d["annotations"][0].pop("area"), ["annotation id 1", "'area'"]),
    "malformed segmentation": (_set_ann("segmentation", "oops"), ["annotation id 2", "'segmentation'"]),
    # refused by the JSON parser (yajl) before any field check, as before
    "polygon with NaN": (_set_ann("segmentation", [[1, 1, 4, float("nan"), 4, 3]]), ["not valid JSON"]),
    # fields that used to pass prepare and fail a later stage with a library traceback (a user trial found them)
    "area a string": (_set_ann("area", "6.0"), ["annotation id 2", "'area'", "'6.0'"]),
    "area negative": (_set_ann("area", -1.0), ["annotation id 2", "'area'"]),
    "bbox of three": (_set_ann("bbox", [1, 1, 3]), ["annotation id 2", "'bbox'"]),
    "bbox with a string": (_set_ann("bbox", [1, 1, "3", 2]), ["annotation id 2", "'bbox'"]),
    "bbox negative height": (_set_ann("bbox", [1, 1, 3, -2]), ["annotation id 2", "negative"]),
    "iscrowd a string": (_set_ann("iscrowd", "no"), ["annotation id 2", "'iscrowd'", "'no'"]),
    "polygon of two points": (_set_ann("segmentation", [[1, 1, 4, 1]]), ["annotation id 2", "fewer than three"]),
    "polygon of odd length": (_set_ann("segmentation", [[1, 1, 4, 1, 4, 3, 1]]), ["annotation id 2", "odd"]),
    "polygon of strings": (_set_ann("segmentation", [["1", "1", "4", "1", "4", "3"]]), ["annotation id 2", "'1'"]),
    "no polygon": (_set_ann("segmentation", []), ["annotation id 2", "no polygon"]),
    "polygon far outside": (_set_ann("segmentation", [[1, 1, 1e30, 1, 4, 3]]), ["annotation id 2", "8x6 image"]),
    "polygon not a list": (_set_ann("segmentation", [7]), ["annotation id 2", "polygon must be a list"]),
    "RLE without size": (_set_ann("segmentation", {"counts": "PP"}), ["annotation id 2", "'size'"]),
    "RLE of another size": (
        _set_ann("segmentation", {"counts": [48], "size": [8, 6]}),
        ["annotation id 2", "[8, 6]", "[6, 8]"],
    ),
    "RLE counts short": (_set_ann("segmentation", {"counts": [1, 2], "size": [6, 8]}), ["add up to 3", "48 pixels"]),
    "RLE string garbage": (_set_ann("segmentation", {"counts": "abc", "size": [6, 8]}), ["compressed RLE"]),
    "RLE counts a number": (_set_ann("segmentation", {"counts": 5, "size": [6, 8]}), ["'counts'", "int"]),
    "width a string": (lambda d: d["images"][1].__setitem__("width", "8"), ["image id 2", "'width'", "'8'"]),
    "height zero": (lambda d: d["images"][0].__setitem__("height", 0), ["image id 1", "'height'"]),
    "coco_url without a folder": (
        lambda d: d["images"][1].__setitem__("coco_url", "http://host/x.jpg"),
        ["image id 2", "coco_url", "<folder>/<file>"],
    ),
    "category name a number": (lambda d: d["categories"][1].__setitem__("name", 7), ["category id 2", "'name'"]),
    "category name empty": (lambda d: d["categories"][1].__setitem__("name", " "), ["category id 2", "'name'"]),
    "synonyms a string": (
        lambda d: d["categories"][0].__setitem__("synonyms", "stoplight"),
        ["category id 1", "'synonyms'"],
    ),
}


@pytest.mark.parametrize("case", list(LVIS_ERRORS))
def test_lvis_structural_errors(tmp_path: Path, case: str) -> None:
    mutate, parts = LVIS_ERRORS[case]
    data = lvis_train()
    mutate(data)
    path = write_json(tmp_path / "lvis_v1_train.json", data)
    with pytest.raises(PipelineError) as err:
        validate_lvis(path)
    one_line(err, path, *parts)


UNHASHABLE_IDS = {
    "annotation category_id is a list": lambda d: d["annotations"][0].__setitem__("category_id", [1]),
    "annotation image_id is a list": lambda d: d["annotations"][0].__setitem__("image_id", [1]),
    "image id is a list": lambda d: d["images"][0].__setitem__("id", [1]),
    "category id is an object": lambda d: d["categories"][0].__setitem__("id", {"a": 1}),
    "neg_category_ids holds a list": lambda d: d["images"][0].__setitem__("neg_category_ids", [[1]]),
}


@pytest.mark.parametrize("case", list(UNHASHABLE_IDS))
def test_lvis_unhashable_id_is_a_pipeline_error(tmp_path: Path, case: str) -> None:
    data = lvis_train()
    UNHASHABLE_IDS[case](data)
    path = write_json(tmp_path / "lvis_v1_train.json", data)
    with pytest.raises(PipelineError) as err:
        validate_lvis(path)
    one_line(err, path)


COCO_ERRORS = {
    "missing annotations": (_del("annotations"), ["'annotations'"]),
    "unknown category_id": (_set_ann("category_id", 5, 0), ["annotation id 1", "unknown category_id 5"]),
    "unknown image_id": (_set_ann("image_id", 99, 0), ["annotation id 1", "unknown image_id 99"]),
    "duplicate category id": (_dup("categories"), ["duplicate category id 10"]),
    "category missing name": (lambda d: d["categories"][0].pop("name"), ["category id 10", "'name'"]),
    "missing segmentation": (lambda d: d["annotations"][1].pop("segmentation"), ["annotation id 2", "'segmentation'"]),
    "polygon of strings": (_set_ann("segmentation", [["1", "1", "4", "1", "4", "3"]], 0), ["annotation id 1", "'1'"]),
    "crowd RLE short": (
        _set_ann("segmentation", {"counts": [5, 5], "size": [6, 8]}, 0),
        ["annotation id 1", "add up to 10"],
    ),
    "iscrowd a string": (_set_ann("iscrowd", "no", 0), ["annotation id 1", "'iscrowd'"]),
    "bbox not a list": (_set_ann("bbox", "1 1 3 2", 0), ["annotation id 1", "'bbox'"]),
}


@pytest.mark.parametrize("case", list(COCO_ERRORS))
def test_coco_structural_errors(tmp_path: Path, case: str) -> None:
    mutate, parts = COCO_ERRORS[case]
    data = coco_base()
    mutate(data)
    path = write_json(tmp_path / "instances.json", data)
    with pytest.raises(PipelineError) as err:
        validate_coco(path)
    one_line(err, path, *parts)


def test_coco_counts_short_polygons_that_lvis_refuses(tmp_path: Path) -> None:
    """A COCO polygon under three points is counted (the proposer's loader drops it, as detectron2 does), not
    refused: COCO train2017 has degenerate annotations. `area` and `iscrowd` are optional in COCO."""
    data = coco_base()
    data["annotations"][0]["segmentation"] = [[1, 1, 4, 1]]
    data["annotations"][1]["segmentation"] = [[1, 1, 4, 1, 4, 3], [2, 2]]
    del data["annotations"][1]["area"], data["annotations"][1]["iscrowd"]
    assert validate_coco(write_json(tmp_path / "c.json", data)).n_short_polygons == 2
    data["annotations"][0]["iscrowd"] = 1  # training leaves crowds out anyway: not counted
    data["annotations"][1]["segmentation"] = []  # no polygon: allowed in COCO (the loader drops the instance)
    assert validate_coco(write_json(tmp_path / "c.json", data)).n_short_polygons == 0
    assert validate_coco(write_json(tmp_path / "ok.json", coco_base())).n_short_polygons == 0


def test_overflowing_coordinate_is_one_line(tmp_path: Path) -> None:
    """1e999 is valid JSON that reads as inf, which pycocotools' rasteriser would exhaust memory on: the stream
    refuses it (yajl: numeric overflow)."""
    data = lvis_train()
    data["annotations"][1]["segmentation"] = [[1, 1, 4, 1, 4, 12345.5]]
    path = tmp_path / "inf.json"
    path.write_text(json.dumps(data).replace("12345.5", "1e999"))
    with pytest.raises(PipelineError) as err:
        validate_lvis(path)
    one_line(err, path, "overflow")


def test_iscrowd_booleans_and_float_coordinates_pass(tmp_path: Path) -> None:
    data = lvis_train()
    data["annotations"][0]["iscrowd"] = False
    data["annotations"][1]["iscrowd"] = 0
    data["annotations"][2]["segmentation"] = [[0.5, 0.5, 8.5, 0.5, 8.5, 6.5]]  # a pixel over the border is fine
    data["annotations"][2]["area"] = 0  # COCO train2017 has zero-area annotations
    validate_lvis(write_json(tmp_path / "l.json", data))


def test_coco_does_not_require_lvis_keys(tmp_path: Path) -> None:
    """COCO images carry no neg_category_ids and categories no frequency; that is fine for validate_coco."""
    data = coco_base()
    assert "neg_category_ids" not in data["images"][0]
    validate_coco(write_json(tmp_path / "c.json", data))


# ---------------------------------------------------------------------------------------------
# image paths and images


def test_image_path_file_name(tmp_path: Path) -> None:
    rec = {"id": 1, "file_name": "train/000001.png", "coco_url": "http://x/val2017/1.jpg"}
    assert image_path(rec, tmp_path) == tmp_path / "train" / "000001.png"  # file_name wins


def test_image_path_coco_url() -> None:
    rec = {"id": 139, "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg"}
    assert image_path(rec, Path("root")) == Path("root/val2017/000000000139.jpg")
    assert image_path(rec, "root") == Path("root") / "val2017" / "000000000139.jpg"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://images.cocodataset.org/train2017/000000391895.jpg", "train2017/000000391895.jpg"),
        ("http://images.cocodataset.org/val2017/000000000139.jpg", "val2017/000000000139.jpg"),
        ("https://images.cocodataset.org/train2017/000000391895.jpg?raw=1#x", "train2017/000000391895.jpg"),
        ("http://images.cocodataset.org//val2017//000000000139.jpg/", "val2017/000000000139.jpg"),
        ("http://mirror.example/coco/2017/train2017/000000391895.jpg", "train2017/000000391895.jpg"),
        ("train2017/000000391895.jpg", "train2017/000000391895.jpg"),
    ],
)
def test_image_path_lvis_record_is_the_last_two_url_components(url: str, expected: str) -> None:
    """Real LVIS v1 records carry no file_name: coco_url says which COCO folder (train2017 or val2017)."""
    rec = {"id": 1, "width": 640, "height": 480, "coco_url": url, "neg_category_ids": []}
    assert image_path(rec, Path("/data/coco")) == Path("/data/coco") / expected


@pytest.mark.parametrize("url", ["http://images.cocodataset.org/", "000000391895.jpg", "http://x/../a.jpg"])
def test_image_path_coco_url_without_a_folder(url: str) -> None:
    with pytest.raises(PipelineError) as err:
        image_path({"id": 7, "coco_url": url}, Path("root"))
    one_line(err, "image id 7", "coco_url", repr(url))


def test_image_path_coco_bare_file_name_under_the_coco_folder() -> None:
    """A COCO 2017 record's bare file_name lives in the folder the caller passes (<coco>/train2017)."""
    rec = {"id": 397133, "width": 640, "height": 427, "file_name": "000000397133.jpg"}
    assert image_path(rec, Path("/data/coco/train2017")) == Path("/data/coco/train2017/000000397133.jpg")


def test_image_path_synthetic_record() -> None:
    rec = {"id": 1, "file_name": "train/000001.png", "coco_url": "http://synthetic.local/train/000001.png"}
    root = Path("data/prepared/world/images")
    assert image_path(rec, root) == root / "train" / "000001.png"


def test_image_path_neither() -> None:
    with pytest.raises(PipelineError) as err:
        image_path({"id": 5, "file_name": ""}, Path("root"))
    one_line(err, "image id 5", "file_name", "coco_url")


@pytest.mark.parametrize("key", ["file_name", "coco_url"])
def test_image_path_non_string(key: str) -> None:
    with pytest.raises(PipelineError) as err:
        image_path({"id": 5, key: 17}, Path("root"))
    assert str(err.value) == f"image id 5: {key!r} must be a string, got 17"


def _check(images: list[dict], root: Path, **kw: int) -> int:
    return check_sampled_images(images, root, "LVIS train annotations", Path("/ann/lvis_v1_train.json"), **kw)


def test_check_sampled_images_passes(dataset: dict[str, Path]) -> None:
    root = dataset["root"]
    images = lvis_train()["images"]
    assert _check(images, root) == len(images)
    assert _check(lvis_val()["images"], root) == 2
    assert _check(coco_base()["images"], root / "train2017") == 2
    assert _check(images, root, sample=1) == 1
    assert _check([], root) == 0


def test_check_sampled_images_missing_file(dataset: dict[str, Path]) -> None:
    root = dataset["root"]
    images = lvis_train()["images"] + [{"id": 3, "width": 8, "height": 6, "file_name": "train/000003.png"}]
    (root / "train2017" / "000000000002.jpg").unlink()
    with pytest.raises(PipelineError) as err:
        _check(images, root)
    # every missing file of the sample is counted; the first one is named, relative to the folder named
    assert str(err.value) == (
        f"LVIS train annotations /ann/lvis_v1_train.json: image train2017/000000000002.jpg not found under {root} "
        "(2 of 3 sampled images missing)"
    )


def test_check_sampled_images_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "no_images"
    with pytest.raises(PipelineError) as err:
        _check(lvis_train()["images"], root)
    assert str(err.value) == f"LVIS train annotations /ann/lvis_v1_train.json: image folder {root} not found"


def test_check_sampled_images_root_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.write_text("not a folder")
    with pytest.raises(PipelineError) as err:
        _check(lvis_train()["images"], root)
    one_line(err, root, "not found")


def test_check_sampled_images_is_seeded(tmp_path: Path) -> None:
    """Sampling is deterministic for a given seed: the same file is reported each time."""
    root = tmp_path / "images"
    root.mkdir()
    images = [{"id": i, "width": 8, "height": 6, "file_name": f"{i:03d}.png"} for i in range(40)]
    msgs = set()
    for _ in range(3):
        with pytest.raises(PipelineError) as err:
            _check(images, root, sample=5, seed=7)
        msgs.add(one_line(err, "5 of 5"))
    assert len(msgs) == 1


def test_check_sampled_images_wrong_size(dataset: dict[str, Path]) -> None:
    """A JPEG whose size is not the record's width x height: the classic annotation/folder mismatch."""
    root = dataset["root"]
    write_image(root / "val2017" / "000000000139.jpg", fmt="JPEG", size=(6, 8))  # rotated: 6 wide, 8 high
    with pytest.raises(PipelineError) as err:
        _check(lvis_val()["images"], root)
    assert str(err.value) == (
        f"LVIS train annotations /ann/lvis_v1_train.json: image val2017/000000000139.jpg under {root} "
        "is 6x8 pixels but image id 139 says 8x6"
    )


def test_check_sampled_images_unreadable(dataset: dict[str, Path]) -> None:
    root = dataset["root"]
    path = root / "val2017" / "000000000139.jpg"
    path.write_bytes(path.read_bytes()[:60])  # a JPEG header and no pixels
    with pytest.raises(PipelineError) as err:
        _check(lvis_val()["images"], root)
    msg = one_line(err, "/ann/lvis_v1_train.json", "val2017/000000000139.jpg", "cannot be read")
    assert msg.startswith(
        f"LVIS train annotations /ann/lvis_v1_train.json: image val2017/000000000139.jpg under {root}"
    )


def test_non_string_file_name_is_a_pipeline_error(tmp_path: Path) -> None:
    data = lvis_train()
    data["images"][0]["file_name"] = 5
    path = write_json(tmp_path / "lvis_v1_train.json", data)
    (tmp_path / "images").mkdir()
    with pytest.raises(PipelineError) as err:
        _check(validate_lvis(path).images, tmp_path / "images")
    one_line(err)


def test_excluded_image_ids() -> None:
    """LVIS val images that the proposer's COCO file also holds, by id, sorted; nothing else."""
    assert excluded_image_ids(lvis_val()["images"], coco_base()["images"]) == EXCLUDED_IDS
    val = [{"id": i} for i in (30, 5, 139, 7)]
    coco = [{"id": i} for i in (7, 1, 30, 2, 5)]
    assert excluded_image_ids(val, coco) == [5, 7, 30]
    assert excluded_image_ids(val, []) == [] and excluded_image_ids([], coco) == []


def test_load_image_ok(tmp_path: Path) -> None:
    rgb = load_image(write_image(tmp_path / "a.png"))
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    gray = load_image(write_image(tmp_path / "g.png", mode="L"))
    assert gray.shape == (6, 8, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], gray[..., 2])
    assert load_image(write_image(tmp_path / "b.jpg", fmt="JPEG")).shape == (6, 8, 3)


def test_load_image_missing(tmp_path: Path) -> None:
    path = tmp_path / "val2017" / "000000000139.jpg"
    with pytest.raises(PipelineError) as err:
        load_image(path)
    one_line(err, path, "not found")


def test_load_image_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all\n" * 4)
    with pytest.raises(PipelineError) as err:
        load_image(path)
    one_line(err, path, "cannot read image")


def test_load_image_truncated_png(tmp_path: Path) -> None:
    path = write_image(tmp_path / "t.png")
    path.write_bytes(path.read_bytes()[:40])  # valid signature and header, no pixel data
    with pytest.raises(PipelineError) as err:
        load_image(path)
    one_line(err, path)
