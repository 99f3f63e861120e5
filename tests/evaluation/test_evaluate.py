import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.evaluate import evaluate_clusters
from pipeline.evaluation.lvis_eval import BACKENDS, METRIC_KEYS


def _run(world, assignment, k, **kwargs):
    return evaluate_clusters(
        world.gt_json,
        world.image_ids,
        world.image_hw,
        world.image_offsets,
        world.boxes,
        world.scores,
        world.masks,
        assignment,
        k,
        progress=False,
        **kwargs,
    )


def test_perfect_clustering_scores_one_on_every_row(tiny_world):
    result = _run(tiny_world, tiny_world.category_assignment, 3)
    m = result.metrics
    for row in ("majority", "hungarian", "oracle"):
        for key in METRIC_KEYS:
            assert m[row][key] == pytest.approx(1.0), (row, key)
    assert result.mappings == {"majority": {0: 1, 1: 2, 2: 3}, "hungarian": {0: 1, 1: 2, 2: 3}}
    assert result.matches.category.tolist() == tiny_world.category.tolist()
    assert m["clustering"]["all"] == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "purity": 1.0, "n": 7}
    assert all(m["clustering"][b]["purity"] == 1.0 for b in "rcf")
    assert m["counts"]["matched_proposals"] == 7 and m["counts"]["proposals"] == 8
    # the background proposal sits in cluster 0: a (low-scored) false positive for majority and hungarian
    assert len(result.detections["majority"]) == 8 and len(result.detections["oracle"]) == 7
    json.dumps(m)  # JSON-ready


def test_merged_clusters_score_lower_but_oracle_does_not(tiny_world):
    result = _run(tiny_world, np.zeros(len(tiny_world.scores), dtype=np.int64), 2)
    m = result.metrics
    assert result.mappings["majority"] == {0: 3} and result.mappings["hungarian"] == {0: 3}
    assert m["majority"]["AP"] < 0.5 and m["hungarian"]["AP"] < 0.5
    assert m["oracle"]["AP"] == pytest.approx(1.0)
    assert m["counts"]["clusters_nonempty"] == 1 and m["clustering"]["all"]["nmi"] == pytest.approx(0.0)


def test_backends_give_the_same_metrics(tiny_world):
    rng = np.random.default_rng(1)
    assignment = rng.integers(0, 3, len(tiny_world.scores))
    metrics = {backend: _run(tiny_world, assignment, 3, backend=backend).metrics for backend in BACKENDS}
    for row in ("majority", "hungarian", "oracle"):
        for key in METRIC_KEYS:
            assert metrics["faster_coco_eval"][row][key] == metrics["lvis"][row][key], (row, key)
    assert metrics["lvis"]["counts"] == metrics["faster_coco_eval"]["counts"]


def test_subset_of_images(tiny_world):
    w = tiny_world
    n = w.image_offsets[2]
    result = evaluate_clusters(
        w.gt_json,
        w.image_ids[:2],
        w.image_hw[:2],
        w.image_offsets[:3],
        w.boxes[:n],
        w.scores[:n],
        w.masks[:n],
        w.category_assignment[:n],
        3,
        progress=False,
    )
    assert result.metrics["oracle"]["AP"] == pytest.approx(1.0)
    assert result.metrics["counts"]["gt_instances"] == 5


def test_wrong_image_size_is_a_pipeline_error(tiny_world):
    w = tiny_world
    with pytest.raises(PipelineError):
        evaluate_clusters(
            w.gt_json,
            w.image_ids,
            w.image_hw + 1,
            w.image_offsets,
            w.boxes,
            w.scores,
            w.masks,
            w.category_assignment,
            3,
            progress=False,
        )
