"""`stages.prepare` on real-layout files (tests/data/lvis_files.py): `prepare_lvis`'s manifest and one-line errors,
`main` writing nothing before every check has passed, and `stages.common.image_loader` on the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Params, as_dict, parse_params
from pipeline.data.dataset import Manifest
from pipeline.data.lvis_format import (
    load_image,
)
from pipeline.errors import PipelineError
from stages.prepare import coco_image_folder, prepare_lvis
from tests.data.lvis_files import (
    BASE_IDS,
    EXCLUDED_IDS,
    coco_base,
    lvis_params,
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
# stages.prepare.prepare_lvis


def test_prepare_lvis_valid(dataset: dict[str, Path]) -> None:
    manifest, text = prepare_lvis(lvis_params(dataset))
    assert isinstance(manifest, Manifest)
    assert manifest.source == "lvis"
    assert manifest.base_category_ids == BASE_IDS
    assert manifest.train_json == str(dataset["train"])
    assert manifest.val_json == str(dataset["val"])
    assert manifest.proposer_json == str(dataset["coco"])
    assert manifest.image_root == str(dataset["root"])
    assert set(manifest.files) == {str(dataset[k]) for k in ("train", "val", "coco")}
    # COCO's bare file_names live in <image_root>/train2017; LVIS val image 9 is also a COCO train image
    assert manifest.proposer_image_root == str(dataset["root"] / "train2017")
    assert manifest.proposer_images() == (dataset["root"] / "train2017")
    assert manifest.proposer_excluded_image_ids == EXCLUDED_IDS
    assert "\n" not in text and "2 train / 2 val images" in text and "2 matched" in text
    assert "proposer: 1 of 2 COCO images, 1 left out as LVIS val images" in text


def test_prepare_lvis_manifest_depends_on_the_files_contents_not_their_times_or_the_workspace(
    dataset: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths stay relative (two clones of the workspace write the same manifest); the files are
    recorded by content, so touching one changes nothing and rewriting one changes its digest."""
    monkeypatch.chdir(tmp_path)
    relative = {k: v.relative_to(tmp_path) for k, v in dataset.items()}
    first, _ = prepare_lvis(lvis_params(relative))
    assert first.val_json == "ann/lvis_v1_val.json" and first.image_root == "images"
    assert first.proposer_image_root == "images/train2017" and "ann/lvis_v1_val.json" in first.files
    os.utime(dataset["val"], (1, 1))
    assert prepare_lvis(lvis_params(relative))[0] == first
    data = lvis_val()
    data["annotations"][0]["area"] = 7.0
    write_json(dataset["val"], data)
    changed, _ = prepare_lvis(lvis_params(relative))
    assert changed.files["ann/lvis_v1_val.json"] != first.files["ann/lvis_v1_val.json"]
    assert {k: v for k, v in changed.files.items() if "val" not in k} == {
        k: v for k, v in first.files.items() if "val" not in k
    }


def test_prepare_lvis_from_parsed_params(dataset: dict[str, Path]) -> None:
    """The same params built through parse_params (as params.yaml would be) give the same manifest."""
    p = parse_params(as_dict(lvis_params(dataset)))
    assert p.data.source == "lvis"
    manifest, _ = prepare_lvis(p)
    assert manifest.base_category_ids == BASE_IDS


def test_prepare_lvis_missing_image_root(dataset: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "missing_images"
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset, root=root))
    one_line(err, root, "image_root")


@pytest.mark.parametrize("which", ["train", "val", "coco"])
def test_prepare_lvis_corrupt_json(dataset: dict[str, Path], which: str) -> None:
    path = dataset[which]
    path.write_text(path.read_text()[:-25])
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    one_line(err, path, "not valid JSON", "line", "column")


def test_prepare_lvis_missing_json(dataset: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "ann" / "lvis_v1_minival.json"
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset, val=path))
    one_line(err, path, "not found")


def test_prepare_lvis_missing_image_file(dataset: dict[str, Path]) -> None:
    root = dataset["root"]
    (root / "val2017" / "000000000139.jpg").unlink()
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    assert str(err.value) == (
        f"LVIS val annotations {dataset['val']}: image val2017/000000000139.jpg not found under {root} "
        "(1 of 2 sampled images missing)"
    )


def test_prepare_lvis_missing_val_image_from_train2017(dataset: dict[str, Path]) -> None:
    """LVIS v1 val images from COCO train2017 are looked up in train2017/, through coco_url."""
    root = dataset["root"]
    (root / "train2017" / "000000000009.jpg").unlink()
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    assert str(err.value) == (
        f"LVIS val annotations {dataset['val']}: image train2017/000000000009.jpg not found under {root} "
        "(1 of 2 sampled images missing)"
    )


def test_prepare_lvis_missing_coco_image(dataset: dict[str, Path]) -> None:
    data = coco_base()
    data["images"].append({"id": 30, "width": 8, "height": 6, "file_name": "000000000030.jpg"})
    write_json(dataset["coco"], data)
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    assert str(err.value) == (
        f"COCO annotations {dataset['coco']}: image 000000000030.jpg not found under {dataset['root'] / 'train2017'} "
        "(1 of 3 sampled images missing)"
    )


def test_prepare_lvis_coco_image_root_param(dataset: dict[str, Path], tmp_path: Path) -> None:
    """data.lvis.coco_image_root moves the COCO folder; its images are checked there, sizes included."""
    coco_root = tmp_path / "elsewhere" / "coco_train"
    write_image(coco_root / "000000000002.jpg", fmt="JPEG")
    write_image(coco_root / "000000000009.jpg", fmt="JPEG", size=(8, 7))
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset, coco_image_root=coco_root))
    assert str(err.value) == (
        f"COCO annotations {dataset['coco']}: image 000000000009.jpg under {coco_root} is 8x7 pixels "
        "but image id 9 says 8x6"
    )
    write_image(coco_root / "000000000009.jpg", fmt="JPEG")
    manifest, _ = prepare_lvis(lvis_params(dataset, coco_image_root=coco_root))
    assert manifest.proposer_image_root == str(coco_root)
    assert manifest.image_root == str(dataset["root"])


def test_prepare_lvis_wrong_image_size(dataset: dict[str, Path]) -> None:
    root = dataset["root"]
    write_image(root / "train2017" / "000000000002.jpg", fmt="JPEG", size=(16, 12))
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    assert str(err.value) == (
        f"LVIS train annotations {dataset['train']}: image train2017/000000000002.jpg under {root} is 16x12 pixels "
        "but image id 2 says 8x6"
    )


def test_prepare_lvis_missing_coco_folder(dataset: dict[str, Path], tmp_path: Path) -> None:
    root = dataset["root"]
    (root / "train2017").rename(tmp_path / "moved")
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    assert str(err.value) == (
        f"data.lvis.image_root: {root} has no train2017 folder for the COCO file's images "
        f"({root / 'train2017'} not found; set data.lvis.coco_image_root to where they are)"
    )
    missing = tmp_path / "nowhere"
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset, coco_image_root=missing))
    assert str(err.value) == f"data.lvis.coco_image_root: {missing}: folder not found"


def test_coco_image_folder_default(dataset: dict[str, Path]) -> None:
    assert coco_image_folder(lvis_params(dataset).data.lvis) == dataset["root"] / "train2017"


def test_prepare_lvis_invalid_structure(dataset: dict[str, Path]) -> None:
    data = lvis_train()
    data["categories"][0]["frequency"] = "x"
    write_json(dataset["train"], data)
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    one_line(err, dataset["train"], "category id 1", "frequency 'x'")


def test_prepare_lvis_empty_path_names_the_params_file(dataset: dict[str, Path]) -> None:
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset, val=""), params_file="experiments/lvis.yaml")
    msg = one_line(err, "data.lvis.val_json is empty")
    assert msg.startswith("experiments/lvis.yaml: ")


def test_prepare_lvis_reports_short_coco_polygons(dataset: dict[str, Path]) -> None:
    data = coco_base()
    data["annotations"][0]["segmentation"] = [[1, 1, 4, 1]]
    write_json(dataset["coco"], data)
    _, text = prepare_lvis(lvis_params(dataset))
    assert "; 1 COCO annotations hold polygons under three points" in text and "\n" not in text


def test_prepare_lvis_refuses_a_string_area_before_any_stage_runs(dataset: dict[str, Path]) -> None:
    """Found by a user trial: it used to pass prepare and fail in evaluate, the last stage, inside LVISEval."""
    data = lvis_val()
    data["annotations"][0]["area"] = "12.5"
    write_json(dataset["val"], data)
    with pytest.raises(PipelineError) as err:
        prepare_lvis(lvis_params(dataset))
    one_line(err, dataset["val"], f"annotation id {data['annotations'][0]['id']}", "'area'")


# ---------------------------------------------------------------------------------------------
# stages.prepare.main: nothing is written before every check has passed


def _run_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: Params) -> None:
    import yaml

    import stages.prepare

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(as_dict(p), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    stages.prepare.main(params_file="params.yaml")


def test_prepare_main_keeps_the_old_output_on_error(
    dataset: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    prepared = tmp_path / "data" / "prepared"
    write_json(prepared / "dataset.json", {"old": True})
    (dataset["root"] / "train2017" / "000000000009.jpg").unlink()
    with pytest.raises(SystemExit) as code:
        _run_prepare(tmp_path, monkeypatch, lvis_params(dataset))
    assert code.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: LVIS val annotations ") and "\n" not in err
    assert json.loads((prepared / "dataset.json").read_text()) == {"old": True}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]  # no temporary leftovers
    assert not (tmp_path / "plots" / "prepare" / "preview.png").exists()


def test_prepare_main_writes_the_manifest(
    dataset: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    write_json(tmp_path / "data" / "prepared" / "dataset.json", {"old": True})
    _run_prepare(tmp_path, monkeypatch, lvis_params(dataset))
    manifest = json.loads((tmp_path / "data" / "prepared" / "dataset.json").read_text())
    assert manifest["proposer_excluded_image_ids"] == EXCLUDED_IDS
    assert manifest["proposer_image_root"] == str(dataset["root"] / "train2017")
    assert (tmp_path / "plots" / "prepare" / "preview.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "[prepare] LVIS: 2 train / 2 val images" in out and "1 left out as LVIS val images" in out


def test_image_loader_resolves_lvis_records_through_coco_url(dataset: dict[str, Path]) -> None:
    """stages.common.image_loader reads a split's images under manifest.image_root: val2017 and train2017."""
    from stages.common import image_loader

    manifest, _ = prepare_lvis(lvis_params(dataset))
    load = image_loader(manifest, "val", np.array([9, 139]))
    for i, folder, name in ((0, "train2017", "000000000009.jpg"), (1, "val2017", "000000000139.jpg")):
        assert np.array_equal(load(i), load_image(dataset["root"] / folder / name))
    with pytest.raises(PipelineError) as err:
        image_loader(manifest, "val", np.array([2]))
    one_line(err, dataset["val"], "image id 2")
