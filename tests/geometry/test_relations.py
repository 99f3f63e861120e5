"""Pair rules: hand-built cases at the thresholds, and the vectorised rules against a naive double loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.errors import PipelineError
from pipeline.geometry.relations import (
    downscale,
    downscale_factor,
    hier_pairs,
    image_relations,
    object_pairs,
    pair_stats,
    relations,
)


def rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def as_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in pairs}


def naive(masks: np.ndarray, iou_thresh: float, containment: float, max_iou: float | None = None):
    """Reference: a Python double loop over pairs, with Python ints."""
    n = len(masks)
    area = [int(m.sum()) for m in masks]
    obj, hier = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            inter = int(np.logical_and(masks[i], masks[j]).sum())
            union = area[i] + area[j] - inter
            iou = inter / union if union > 0 else 0.0
            if i < j and area[i] > 0 and area[j] > 0 and iou > iou_thresh:
                obj.append((i, j))
            # i parent, j child
            contained = area[j] > 0 and area[j] < area[i] and inter / area[j] >= containment
            if contained and (max_iou is None or iou <= max_iou):
                hier.append((i, j))
    return obj, hier


def test_pair_stats_small():
    masks = np.stack([rect(4, 4, 0, 2, 0, 2), rect(4, 4, 1, 3, 1, 3), np.zeros((4, 4), bool)])
    inter, area = pair_stats(masks)
    assert inter.dtype == np.int64 and area.dtype == np.int64
    np.testing.assert_array_equal(area, [4, 4, 0])
    np.testing.assert_array_equal(inter, [[4, 1, 0], [1, 4, 0], [0, 0, 0]])


def test_pair_stats_empty_set():
    inter, area = pair_stats(np.zeros((0, 5, 7), bool))
    assert inter.shape == (0, 0) and area.shape == (0,)
    assert object_pairs(np.zeros((0, 5, 7), bool)).shape == (0, 2)
    assert hier_pairs(np.zeros((0, 5, 7), bool)).shape == (0, 2)


def test_iou_just_above_and_below_threshold():
    # a: 10x10 = 100 px. b shares 100 - k columns... use a 1-row strip geometry for exact IoU values.
    # a = cols [0, 10), b = cols [s, s + 10): inter = 10 - s, union = 10 + s, IoU = (10 - s) / (10 + s)
    # s = 4 -> 6/14 = 0.4286 (> 0.4), s = 5 -> 5/15 = 0.333 (< 0.4)
    a = rect(1, 30, 0, 1, 0, 10)
    above = np.stack([a, rect(1, 30, 0, 1, 4, 14)])
    below = np.stack([a, rect(1, 30, 0, 1, 5, 15)])
    assert as_set(object_pairs(above, 0.4)) == {(0, 1)}
    assert as_set(object_pairs(below, 0.4)) == set()
    # exactly at the threshold: IoU = 0.4 is not > 0.4 (inter 4, union 10: a = [0,7), b = [3,10))
    at = np.stack([rect(1, 30, 0, 1, 0, 7), rect(1, 30, 0, 1, 3, 10)])
    assert as_set(object_pairs(at, 0.4)) == set()
    assert as_set(object_pairs(at, 0.39)) == {(0, 1)}


def test_full_containment_is_hierarchy():
    parent = rect(20, 20, 0, 20, 0, 20)  # 400
    child = rect(20, 20, 5, 10, 5, 10)  # 25, IoU 0.0625
    masks = np.stack([child, parent])
    assert hier_pairs(masks, 0.95).tolist() == [[1, 0]]  # parent first
    assert hier_pairs(masks, 1.0).tolist() == [[1, 0]]
    assert object_pairs(masks, 0.4).shape == (0, 2)


def test_partial_containment_at_threshold():
    parent = rect(10, 40, 0, 10, 0, 30)  # 300
    # child 20 px, 19 inside the parent -> 0.95 exactly; 18 inside -> 0.90
    child_95 = rect(10, 40, 0, 1, 11, 31)
    child_90 = rect(10, 40, 0, 1, 12, 32)
    assert hier_pairs(np.stack([parent, child_95]), 0.95).tolist() == [[0, 1]]
    assert hier_pairs(np.stack([parent, child_90]), 0.95).shape == (0, 2)
    assert hier_pairs(np.stack([parent, child_90]), 0.9).tolist() == [[0, 1]]


def test_equal_areas_never_hierarchy():
    a = rect(10, 10, 0, 5, 0, 4)  # 20 px
    b = rect(10, 10, 0, 4, 0, 5)  # 20 px, inter 16 -> 0.8
    assert hier_pairs(np.stack([a, b]), 0.5).shape == (0, 2)


def test_identical_masks_are_one_object_not_a_hierarchy():
    a = rect(8, 8, 1, 6, 2, 7)
    obj, hier = relations(np.stack([a, a]), object_iou=0.4, hier_containment=0.95)
    assert obj.tolist() == [[0, 1]]
    assert hier.shape == (0, 2)


def test_empty_masks_never_pair():
    empty = np.zeros((6, 6), bool)
    full = np.ones((6, 6), bool)
    masks = np.stack([empty, full, empty])
    obj, hier = relations(masks, object_iou=0.0, hier_containment=1e-9)
    assert obj.shape == (0, 2) and hier.shape == (0, 2)


def test_child_with_high_iou_is_both_unless_exclusive():
    parent = rect(10, 10, 0, 10, 0, 10)  # 100
    child = rect(10, 10, 0, 6, 0, 10)  # 60, fully inside, IoU 0.6
    masks = np.stack([parent, child])
    obj, hier = relations(masks, object_iou=0.4, hier_containment=0.95)
    assert obj.tolist() == [[0, 1]] and hier.tolist() == [[0, 1]]
    obj, hier = relations(masks, object_iou=0.4, hier_containment=0.95, exclusive=True)
    assert obj.tolist() == [[0, 1]] and hier.shape == (0, 2)
    assert hier_pairs(masks, 0.95, max_iou=0.4).shape == (0, 2)
    assert hier_pairs(masks, 0.95, max_iou=0.7).tolist() == [[0, 1]]


def test_nested_chain_and_order():
    big = rect(16, 16, 0, 16, 0, 16)
    mid = rect(16, 16, 0, 8, 0, 8)
    small = rect(16, 16, 0, 2, 0, 2)
    masks = np.stack([small, big, mid])
    assert hier_pairs(masks, 0.95).tolist() == [[1, 0], [1, 2], [2, 0]]


def test_bad_thresholds():
    m = np.zeros((2, 3, 3), bool)
    with pytest.raises(PipelineError):
        object_pairs(m, 1.0)
    with pytest.raises(PipelineError):
        hier_pairs(m, 0.0)
    with pytest.raises(PipelineError):
        object_pairs(np.zeros((3, 3), bool))


def test_downscale_any_pixel():
    m = np.zeros((1, 5, 7), bool)
    m[0, 4, 6] = True
    d = downscale(m, 2)
    assert d.shape == (1, 3, 4)
    assert d.sum() == 1 and d[0, 2, 3]
    assert np.array_equal(downscale(m, 1), m)
    assert downscale_factor((480, 640), None) == 1
    assert downscale_factor((480, 640), 160) == 4
    assert downscale_factor((480, 641), 160) == 5
    assert downscale_factor((100, 100), 160) == 1


def test_downscale_keeps_full_containment():
    parent = rect(64, 64, 3, 40, 5, 50)
    child = rect(64, 64, 10, 13, 20, 21)
    obj, hier = relations(np.stack([parent, child]), object_iou=0.4, hier_containment=1.0, max_side=16)
    assert hier.tolist() == [[0, 1]]


def test_image_relations_pastes_masks():
    # two boxes, full M x M maps: box masks; the small box sits inside the big one
    m = np.full((2, 28, 28), 255, dtype=np.uint8)
    boxes = np.array([[0, 0, 40, 40], [10, 10, 20, 20]], dtype=np.float32)
    obj, hier = image_relations(m, boxes, (48, 64), object_iou=0.4, hier_containment=0.95)
    assert obj.shape == (0, 2)
    assert hier.tolist() == [[0, 1]]
    obj, hier = image_relations(
        np.zeros((0, 28, 28), np.uint8), np.zeros((0, 4)), (48, 64), object_iou=0.4, hier_containment=0.95
    )
    assert obj.shape == (0, 2) and hier.shape == (0, 2) and obj.dtype == np.int64


masks_strategy = st.integers(1, 6).flatmap(
    lambda n: st.tuples(st.integers(1, 6), st.integers(1, 6)).flatmap(
        lambda hw: arrays(bool, (n, hw[0], hw[1]), elements=st.booleans())
    )
)


@settings(max_examples=150, deadline=None)
@given(
    masks=masks_strategy,
    iou_thresh=st.sampled_from([0.0, 0.25, 0.4, 0.5, 0.9]),
    containment=st.sampled_from([0.5, 0.75, 0.95, 1.0]),
    exclusive=st.booleans(),
)
def test_vectorised_equals_naive(masks, iou_thresh, containment, exclusive):
    # duplicate a mask now and then so that identical masks and ties are frequent
    if len(masks) > 1:
        masks = np.concatenate([masks, masks[:1]])
    obj, hier = relations(masks, object_iou=iou_thresh, hier_containment=containment, exclusive=exclusive)
    ref_obj, ref_hier = naive(masks, iou_thresh, containment, iou_thresh if exclusive else None)
    assert obj.tolist() == [list(p) for p in ref_obj]
    assert hier.tolist() == [list(p) for p in ref_hier]
    assert obj.dtype == np.int64 and hier.dtype == np.int64


@settings(max_examples=50, deadline=None)
@given(masks=masks_strategy, factor=st.integers(1, 4))
def test_downscale_equals_naive_blocks(masks, factor):
    d = downscale(masks, factor)
    n, h, w = masks.shape
    for k in range(n):
        for y in range(d.shape[1]):
            for x in range(d.shape[2]):
                assert d[k, y, x] == masks[k, y * factor : (y + 1) * factor, x * factor : (x + 1) * factor].any()
    assert d.shape == (n, -(-h // factor), -(-w // factor))


# ------------------------------------------------------------------------ masks as torch tensors (sample)


@settings(max_examples=60, deadline=None)
@given(masks=masks_strategy, factor=st.integers(1, 4), exclusive=st.booleans())
def test_tensor_masks_give_the_arrays_pairs(masks, factor, exclusive):
    """`sample` passes the paste's tensor: the same pairs, and the device count equals numpy's."""
    import torch

    from pipeline.geometry.relations import _pair_stats_torch

    tensor = torch.from_numpy(masks)
    assert np.array_equal(downscale(tensor, factor).numpy(), downscale(masks, factor))
    side = max(masks.shape[1:]) // factor or None
    want = relations(masks, object_iou=0.4, hier_containment=0.9, max_side=side, exclusive=exclusive)
    got = relations(tensor, object_iou=0.4, hier_containment=0.9, max_side=side, exclusive=exclusive)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    inter, area = _pair_stats_torch(tensor)  # the GPU path, run on the CPU here
    ref_inter, ref_area = pair_stats(masks)
    assert inter.dtype == np.int64 and np.array_equal(inter, ref_inter) and np.array_equal(area, ref_area)


def test_tensor_masks_of_the_wrong_shape():
    import torch

    with pytest.raises(PipelineError, match="expected masks of shape"):
        relations(torch.zeros((4, 4), dtype=torch.bool), object_iou=0.4, hier_containment=1.0)
