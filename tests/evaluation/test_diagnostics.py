"""Diagnostics: the ground-truth breakdown of sampled (parent, child) pairs, and the learnt hierarchy."""

import math

import numpy as np

from pipeline.evaluation.diagnostics import PAIR_KINDS, pair_breakdown, parent_nearer_origin


def test_pair_breakdown_counts_each_kind_once():
    ann_id = np.array([10, 11, 10, -1, 12, 13])  # proposal -> matched annotation (-1: none)
    relations = [(10, 11), (12, 99)]  # annotation 11 is a part of 10
    pairs = np.array(
        [
            [0, 1],  # 10 -> 11: an annotated object-part pair
            [1, 0],  # 11 -> 10: the wrong way round, both matched
            [0, 2],  # 10 -> 10: two proposals of one instance
            [3, 1],  # the parent proposal matches nothing
            [4, 5],  # 12 -> 13: both matched, not related
        ]
    )
    counts = pair_breakdown(pairs, ann_id, relations)
    assert list(counts) == list(PAIR_KINDS)
    assert counts == {"object-part": 1, "same instance": 1, "other matched": 2, "unmatched": 1}
    assert sum(pair_breakdown(np.zeros((0, 2)), ann_id, relations).values()) == 0


def test_parent_nearer_origin_in_the_ball_and_in_euclidean_space():
    x = np.array([[0.1, 0.0], [0.0, 0.5], [0.9, 0.0]])
    pairs = np.array([[0, 1], [1, 2], [2, 0]])  # two of three have the parent nearer
    ball = parent_nearer_origin(x, pairs, "poincare", 1.0)
    assert math.isclose(ball["fraction"], 2 / 3)
    d0 = [2 * math.atanh(r) for r in (0.1, 0.5, 0.9)]  # the unit ball's distance to the origin
    assert math.isclose(ball["d0_parent"], (d0[0] + d0[1] + d0[2]) / 3, rel_tol=1e-9)
    flat = parent_nearer_origin(x * 10, pairs, "euclidean")
    assert math.isclose(flat["fraction"], 2 / 3) and math.isclose(flat["d0_child"], (5 + 9 + 1) / 3)
    assert math.isnan(parent_nearer_origin(x, np.zeros((0, 2)), "poincare")["fraction"])
