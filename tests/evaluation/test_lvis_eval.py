import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.detections import build_detections, proposal_rles
from pipeline.evaluation.lvis_eval import BACKENDS, METRIC_KEYS, cap_per_image, load_lvis, run_lvis_eval


def _truth_detections(world):
    rles = proposal_rles(world.image_offsets, world.boxes, world.masks, world.image_hw)
    return build_detections(world.image_ids, world.image_offsets, world.scores, rles, world.category)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_as_detections_scores_one(tiny_world, backend):
    dets = _truth_detections(tiny_world)
    assert all("bbox" not in d and isinstance(d["segmentation"]["counts"], str) for d in dets)
    before = json.dumps(dets)
    metrics = run_lvis_eval(tiny_world.gt_json, dets, backend=backend)
    assert set(metrics) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(1.0), key
    assert json.dumps(dets) == before  # the evaluator adds area/bbox/id to copies, not to ours
    if backend == "lvis":
        assert np.float is float  # the compatibility alias lvis 0.5.3 needs


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_detections_scores_zero(tiny_world, backend):
    metrics = run_lvis_eval(tiny_world.gt_json, [], backend=backend)
    assert all(metrics[key] == 0.0 for key in METRIC_KEYS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undefined_bucket_is_none(tiny_world, backend):
    gt = load_lvis(tiny_world.gt_json)
    dets = _truth_detections(tiny_world)
    # image 12 alone: no common ('c') category there, and it is in that image's negative list
    metrics = run_lvis_eval(gt, [d for d in dets if d["image_id"] == 12], image_ids=[12], backend=backend)
    assert metrics["APc"] is None and metrics["APr"] == pytest.approx(1.0) and metrics["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_labels_score_lower(tiny_world, backend):
    dets = _truth_detections(tiny_world)
    swapped = [{**d, "category_id": {1: 2, 2: 3, 3: 1}[d["category_id"]]} for d in dets]
    assert run_lvis_eval(tiny_world.gt_json, swapped, backend=backend)["AP"] < 0.5


def test_cap_per_image_keeps_highest_scores():
    dets = [{"image_id": i % 2, "score": float(s)} for i, s in enumerate(np.random.default_rng(0).random(700))]
    capped = cap_per_image(dets, 300)
    for image in (0, 1):
        kept = [d["score"] for d in capped if d["image_id"] == image]
        all_scores = sorted((d["score"] for d in dets if d["image_id"] == image), reverse=True)
        assert len(kept) == 300 and sorted(kept, reverse=True) == all_scores[:300]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_pipeline_errors(tiny_world, tmp_path, backend):
    with pytest.raises(PipelineError):
        run_lvis_eval(tmp_path / "missing.json", [], backend=backend)
    with pytest.raises(PipelineError):
        bad = [{"image_id": 999, "category_id": 1, "segmentation": {}, "score": 1.0}]
        run_lvis_eval(tiny_world.gt_json, bad, backend=backend)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "height": 2, "width": 2}], "annotations": [], "categories": []}))
    with pytest.raises(PipelineError):
        load_lvis(bad)


def _stock_precision(gt, dets, max_dets=300):
    """lvis 0.5.3's own LVISEval on the same input (the reference the lean evaluator must equal)."""
    from pipeline.evaluation import lvis_eval

    lvis = lvis_eval._lvis()
    lvis_eval._numpy_float_shim()
    with lvis_eval._quiet_lvis():
        stock = lvis.LVISEval(gt, lvis_eval._results(gt, cap_per_image(dets, max_dets), max_dets), iou_type="segm")
        stock.params.max_dets = max_dets
        stock.run()
        lean = lvis_eval._lean_lvis_eval()(
            gt, lvis_eval._results(gt, cap_per_image(dets, max_dets), max_dets), iou_type="segm"
        )
        lean.params.max_dets = max_dets
        lean.run()
    return stock, lean


def test_lean_evaluator_gives_stock_lvis_results(tiny_world):
    """The memory-lean LVISEval (no bookkeeping of empty (image, category) pairs) equals lvis 0.5.3's own:
    every metric and the whole precision array, on exact, mislabelled, rescored and empty detections."""
    gt = load_lvis(tiny_world.gt_json)
    exact = _truth_detections(tiny_world)
    rng = np.random.default_rng(0)
    category_ids = sorted(gt.get_cat_ids())
    mislabelled = [{**d, "category_id": int(rng.choice(category_ids))} for d in exact]
    rescored = [{**d, "score": float(rng.uniform())} for d in exact + mislabelled]
    for dets in (exact, mislabelled, rescored):
        stock, lean = _stock_precision(gt, dets)
        assert stock.results == lean.results
        assert np.array_equal(stock.eval["precision"], lean.eval["precision"])
        assert np.array_equal(stock.eval["recall"], lean.eval["recall"])
