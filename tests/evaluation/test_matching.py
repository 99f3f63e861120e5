import numpy as np
import pycocotools.mask as mask_utils
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.matching import match_image, match_proposals
from pipeline.geometry.masks import annotation_rle

HW = (6, 8)


def _mask(*cells: tuple[slice, slice]) -> np.ndarray:
    m = np.zeros(HW, dtype=bool)
    for ys, xs in cells:
        m[ys, xs] = True
    return m


def _ann(ann_id: int, cat: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "category_id": cat, "segmentation": rle}


def test_iou_exactly_half_matches_and_below_does_not():
    gt = [_ann(7, 3, _mask((slice(0, 2), slice(0, 2))))]  # 4 pixels
    half = _mask((slice(0, 2), slice(0, 1)))  # 2 inside: IoU 2/4
    below = _mask((slice(0, 1), slice(1, 3)))  # 1 inside, 1 outside: IoU 1/5
    category, ann_id, iou = match_image(np.stack([half, below]), gt, HW)
    assert iou[0] == 0.5 and category[0] == 3 and ann_id[0] == 7
    assert iou[1] == pytest.approx(0.2) and category[1] == -1 and ann_id[1] == -1


def test_highest_iou_wins():
    a = _mask((slice(0, 4), slice(0, 4)))
    b = _mask((slice(0, 4), slice(2, 6)))
    prop = _mask((slice(0, 4), slice(2, 5)))  # IoU 6/16 with a, 12/16 with b
    category, ann_id, iou = match_image(prop[None], [_ann(1, 10, a), _ann(2, 20, b)], HW)
    assert (category[0], ann_id[0]) == (20, 2) and iou[0] == pytest.approx(0.75)


def test_equal_iou_goes_to_first_annotation():
    a = _mask((slice(0, 2), slice(0, 2)))
    b = _mask((slice(0, 2), slice(2, 4)))
    prop = _mask((slice(0, 2), slice(1, 3)))  # IoU 2/6 with each
    assert match_image(prop[None], [_ann(1, 10, a), _ann(2, 20, b)], HW, iou_threshold=0.3)[0][0] == 10


def test_polygon_and_uncompressed_rle_ground_truth():
    poly = [[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]]
    rle = annotation_rle(poly, *HW)
    assert mask_utils.area(rle) > 0
    uncompressed = {"size": list(HW), "counts": [0, 12, 36]}  # first 12 pixels (column-major): 2 columns
    mask = mask_utils.decode(annotation_rle(uncompressed, *HW)).astype(bool)
    assert mask.sum() == 12 and mask[:, :2].all()
    gt = [{"id": 5, "category_id": 9, "segmentation": uncompressed}]
    category, _, iou = match_image(mask[None], gt, HW)
    assert category[0] == 9 and iou[0] == 1.0


def test_no_ground_truth_and_no_proposals():
    category, ann_id, iou = match_image(_mask((slice(0, 2), slice(0, 2)))[None], [], HW)
    assert category.tolist() == [-1] and ann_id.tolist() == [-1] and iou.tolist() == [0.0]
    assert len(match_image(np.zeros((0, *HW), dtype=bool), [_ann(1, 1, _mask((slice(0, 1), slice(0, 1))))], HW)[0]) == 0


def test_match_proposals_is_flat_in_image_order_and_accepts_rles():
    gt_a = _ann(1, 10, _mask((slice(0, 3), slice(0, 3))))
    gt_b = _ann(2, 20, _mask((slice(3, 6), slice(4, 8))))
    props_a = np.stack([_mask((slice(0, 3), slice(0, 3))), _mask((slice(5, 6), slice(7, 8)))])
    props_b = [gt_b["segmentation"]]
    matches = match_proposals([props_a, props_b], [[gt_a], [gt_b]], [HW, HW])
    assert matches.category.tolist() == [10, -1, 20]
    assert matches.ann_id.tolist() == [1, -1, 2]
    assert matches.matched.tolist() == [True, False, True] and len(matches) == 3


def test_bad_threshold_is_a_pipeline_error():
    with pytest.raises(PipelineError):
        match_image(np.zeros((1, *HW), dtype=bool), [], HW, iou_threshold=0.0)
