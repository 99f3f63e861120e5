import numpy as np
import pycocotools.mask as mask_utils

from pipeline.evaluation import detections as detections_module
from pipeline.evaluation.detections import build_detections, cluster_detections, oracle_detections, proposal_rles
from pipeline.geometry.paste import paste_masks


def test_proposal_rles_match_paste_and_read_in_blocks(tiny_world, monkeypatch):
    monkeypatch.setattr(detections_module, "READ_BLOCK", 3)  # blocks cut between images
    w = tiny_world
    rles = proposal_rles(w.image_offsets, w.boxes, w.masks, w.image_hw)
    assert len(rles) == len(w.boxes)
    for i in range(len(w.image_ids)):
        s, e = w.image_offsets[i], w.image_offsets[i + 1]
        expected = paste_masks(w.masks[s:e], w.boxes[s:e], tuple(w.image_hw[i]))
        decoded = np.stack([mask_utils.decode(r) for r in rles[s:e]]).astype(bool)
        assert (decoded == expected).all()


def test_cap_at_300_per_image_by_score():
    n = 350
    rng = np.random.default_rng(1)
    scores = rng.random(n + 2)
    rles = [{"size": [2, 2], "counts": "04"}] * (n + 2)
    labels = np.ones(n + 2, dtype=np.int64)
    offsets = np.array([0, n, n + 2])
    dets = build_detections([5, 6], offsets, scores, rles, labels)
    first = [d for d in dets if d["image_id"] == 5]
    assert len(first) == 300 and len(dets) == 302
    assert [d["score"] for d in first] == sorted(scores[:n], reverse=True)[:300]
    assert all(set(d) == {"image_id", "category_id", "segmentation", "score"} for d in dets)


def test_cluster_and_oracle_detections_labels():
    rles = [{"size": [2, 2], "counts": "04"}] * 4
    offsets = np.array([0, 4])
    scores = np.array([0.4, 0.3, 0.2, 0.1])
    dets = cluster_detections([1], offsets, scores, rles, np.array([0, 1, 2, 1]), {1: 20, 2: 30})
    assert [(d["category_id"], d["score"]) for d in dets] == [(20, 0.3), (30, 0.2), (20, 0.1)]
    oracle = oracle_detections([1], offsets, scores, rles, np.array([-1, 7, -1, 8]))
    assert [d["category_id"] for d in oracle] == [7, 8]
