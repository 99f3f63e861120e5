"""faster-coco-eval (LVIS mode, pipeline/evaluation/faster_eval.py) gives LVISEval's nine metrics.

On fabricated detections over three ground truths: the embedded synthetic world (pipeline/data/synthetic.py,
RLE ground truth, parts inside objects), the real LVIS v1 layout of tests/real_layout.py (multi-part
polygons, mixed image sizes, images without annotations, neg and not-exhaustive lists) and the tiny world
of conftest.py. The detections hit every LVIS rule: true and mislabelled masks, shifted masks (IoU between
the thresholds), categories in an image's negative list (scored), in neither list (dropped), in its
not-exhaustive list (unmatched ones ignored), empty masks (dropped), tied scores, detections on images left
out of `image_ids`, and more detections per image than `max_dets`. The evaluator runs once with every
category in one call and once with one category per call (`cells=1`).

Equal means the same doubles: faster_eval.py corrects the one arithmetic difference (LVIS's tp / (tp + fp + eps)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from pipeline.data.synthetic import WorldSpec, generate_world
from pipeline.errors import PipelineError
from pipeline.evaluation.detections import build_detections, proposal_rles
from pipeline.evaluation.faster_eval import _groups, faster_lvis_metrics
from pipeline.evaluation.lvis_eval import BACKENDS, METRIC_KEYS, cap_per_image, load_lvis, run_lvis_eval
from tests.real_layout import write_real_layout

WORLD = WorldSpec(n_train=200, n_val=40, n_categories=24, image_size=64, seed=5)  # r, c and f categories


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def fabricated_detections(gt, seed: int = 0, per_image: int = 6) -> list[dict]:
    """Detections that exercise every LVIS rule (module doc), from the ground truth's own masks."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(gt.get_cat_ids())
    dets = []
    for ann in gt.dataset["annotations"]:
        mask = mask_utils.decode(gt.ann_to_rle(ann))
        for k in range(3):
            dy, dx = (0, 0) if k == 0 else rng.integers(-3, 4, 2)
            moved = np.roll(np.roll(mask, int(dy), axis=0), int(dx), axis=1)
            category = ann["category_id"] if k < 2 else int(rng.choice(category_ids))
            score = float(rng.choice([0.25, 0.5, 0.75])) if k == 1 else float(rng.uniform())  # ties across images
            dets.append(
                {"image_id": ann["image_id"], "category_id": category, "segmentation": _rle(moved), "score": score}
            )
    for image in gt.dataset["images"]:
        h, w = image["height"], image["width"]
        chosen = list(image["neg_category_ids"]) + list(image["not_exhaustive_category_ids"])
        for k in range(per_image):
            mask = np.zeros((h, w), np.uint8)
            y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
            mask[y : y + int(rng.integers(2, 40)), x : x + int(rng.integers(2, 40))] = 1
            pool = chosen if chosen and k % 2 == 0 else category_ids
            dets.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.choice(pool)),
                    "segmentation": _rle(mask),
                    "score": float(rng.uniform()),
                }
            )
        present = sorted({a["category_id"] for a in gt.img_ann_map[image["id"]]})
        if present:  # an empty mask of an annotated category: LVIS drops it
            empty = {"image_id": image["id"], "category_id": present[0], "score": 0.99}
            dets.append({**empty, "segmentation": _rle(np.zeros((h, w), np.uint8))})
    return dets


def assert_backends_agree(gt, dets, *, max_dets: int = 300, image_ids=None) -> dict:
    lvis = run_lvis_eval(gt, dets, max_dets=max_dets, image_ids=image_ids, backend="lvis")
    faster = run_lvis_eval(gt, dets, max_dets=max_dets, image_ids=image_ids, backend="faster_coco_eval")
    capped = cap_per_image([{k: v for k, v in d.items()} for d in dets], max_dets)
    one_per_call = faster_lvis_metrics(gt, capped, max_dets=max_dets, image_ids=image_ids, cells=1)
    assert set(lvis) == set(faster) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert faster[key] == lvis[key], (key, lvis, faster)  # None where LVIS has -1
        assert one_per_call[key] == (-1 if lvis[key] is None else lvis[key]), (key, lvis, one_per_call)
    return lvis


@pytest.fixture(scope="module")
def synthetic_gt(tmp_path_factory):
    """The synthetic world's val split, with a not-exhaustive category on every third image (the world is
    exhaustively annotated: LVIS's rule would go untested)."""
    root = tmp_path_factory.mktemp("world")
    generate_world(WORLD, root, progress=False)
    data = json.loads((root / "lvis_v1_val.json").read_text())
    for k, image in enumerate(data["images"]):
        present = sorted({a["category_id"] for a in data["annotations"] if a["image_id"] == image["id"]})
        if k % 3 == 0 and present:
            image["not_exhaustive_category_ids"] = present[-1:]
    path = root / "lvis_v1_val_not_exhaustive.json"
    path.write_text(json.dumps(data))
    return load_lvis(path)


@pytest.fixture(scope="module")
def real_layout_gt(tmp_path_factory):
    return load_lvis(write_real_layout(tmp_path_factory.mktemp("real_layout"))["val_json"])


def test_synthetic_world_backends_agree(synthetic_gt):
    gt = synthetic_gt
    assert {c["frequency"] for c in gt.dataset["categories"]} == {"r", "c", "f"}
    dets = fabricated_detections(gt)
    metrics = assert_backends_agree(gt, dets)
    assert all(metrics[key] is not None and 0 < metrics[key] < 1 for key in ("AP", "APr", "APc", "APf"))
    image_ids = sorted(gt.get_img_ids())
    assert_backends_agree(gt, dets, image_ids=image_ids[::3])
    assert_backends_agree(gt, dets, max_dets=5)  # the cap and LVIS's own per-image limit


def test_real_layout_backends_agree(real_layout_gt):
    gt = real_layout_gt
    assert any(img["not_exhaustive_category_ids"] for img in gt.dataset["images"])
    assert any(not gt.img_ann_map[i] for i in gt.get_img_ids())  # images without annotations, with detections
    assert all(isinstance(a["segmentation"], list) for a in gt.dataset["annotations"])  # polygons
    for seed in (0, 1, 2):
        dets = fabricated_detections(gt, seed=seed)
        metrics = assert_backends_agree(gt, dets)
        assert metrics["APl"] is None  # no large object: undefined in both
        assert_backends_agree(gt, dets, max_dets=4)
    image_ids = sorted(gt.get_img_ids())
    dets = fabricated_detections(gt, seed=3)
    for subset in (image_ids[:3], image_ids[1::2], [i for i in image_ids if not gt.img_ann_map[i]]):
        assert_backends_agree(gt, dets, image_ids=subset)


def test_tiny_world_backends_agree(tiny_world):
    gt = load_lvis(tiny_world.gt_json)
    rles = proposal_rles(tiny_world.image_offsets, tiny_world.boxes, tiny_world.masks, tiny_world.image_hw)
    exact = build_detections(
        tiny_world.image_ids, tiny_world.image_offsets, tiny_world.scores, rles, tiny_world.category
    )
    rng = np.random.default_rng(0)
    mislabelled = [{**d, "category_id": int(rng.choice([1, 2, 3]))} for d in exact]
    for dets in (exact, mislabelled, exact + mislabelled, [], fabricated_detections(gt, seed=4)):
        assert_backends_agree(gt, dets)
    assert_backends_agree(gt, exact, image_ids=[12])


def test_ground_truth_marked_ignore_is_refused(tmp_path, tiny_world):
    data = json.loads(Path(tiny_world.gt_json).read_text())
    data["annotations"][0]["ignore"] = 1
    path = tmp_path / "ignore.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PipelineError, match="'ignore'.*evaluate.backend: lvis"):
        run_lvis_eval(path, [], backend="faster_coco_eval")
    run_lvis_eval(path, [], backend="lvis")  # LVISEval honours it


def test_unknown_backend_is_a_pipeline_error(tiny_world):
    with pytest.raises(PipelineError, match="unknown evaluation backend 'coco'"):
        run_lvis_eval(tiny_world.gt_json, [], backend="coco")
    assert BACKENDS == ("faster_coco_eval", "lvis")


def test_groups_keep_to_the_cell_budget():
    rng = np.random.default_rng(0)
    cells_of = {cat: {int(i) for i in rng.choice(500, int(rng.integers(1, 200)), replace=False)} for cat in range(60)}
    cells_of[99] = set(range(400))  # a category over the budget alone still gets a group of its own
    for budget in (1, 150, 1000, 20_000, 10**9):
        groups = _groups(cells_of, budget)
        assert [c for cats, _ in groups for c in cats] == sorted(cells_of)
        for cats, images in groups:
            assert images == sorted(set().union(*(cells_of[c] for c in cats)))
            assert len(cats) == 1 or len(images) * len(cats) <= budget
    assert len(_groups(cells_of, 10**9)) == 1 and len(_groups(cells_of, 1)) == len(cells_of)


def test_thresholds_and_area_ranges_are_lvisevals():
    import importlib

    from faster_coco_eval import COCOeval_faster

    from pipeline.evaluation import lvis_eval
    from pipeline.evaluation.faster_eval import AREA_RANGES

    lvis_eval._lvis()  # imports lvis with the root logger kept as it is
    ours = COCOeval_faster(iouType="segm", ranges=AREA_RANGES, lvis_style=True).params
    theirs = importlib.import_module("lvis.eval").Params(iou_type="segm")
    assert np.array_equal(ours.iouThrs, theirs.iou_thrs) and np.array_equal(ours.recThrs, theirs.rec_thrs)
    assert ours.areaRng == theirs.area_rng and ours.areaRngLbl == theirs.area_rng_lbl
    assert ours.imgCountLbl == theirs.img_count_lbl == ["r", "c", "f"]
