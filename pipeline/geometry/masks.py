"""Instance masks: RLE encoding, pairwise IoU, and the ground truth's polygons and RLEs as compressed RLE.

(Pasting the mask head's box-relative maps into the image: pipeline.geometry.paste.)
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils

from pipeline.errors import PipelineError


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of one (H, W) bool mask, with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every mask of `a` (n, H, W) and `b` (m, H, W), as an (n, m) float64 array."""
    a_flat = a.reshape(len(a), -1).astype(np.float32)
    b_flat = b.reshape(len(b), -1).astype(np.float32)
    inter = a_flat @ b_flat.T
    union = a_flat.sum(1)[:, None] + b_flat.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).astype(np.float64)


MIN_POLYGON_COORDS = 6  # three points: detectron2's and mmdetection's rule for a polygon that can be filled


def is_short_polygon(polygon: list) -> bool:
    """Fewer than three points, or an odd number of coordinates: a polygon detectron2 drops (`load_coco_json`)."""
    return len(polygon) < MIN_POLYGON_COORDS or len(polygon) % 2 == 1


def annotation_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Compressed RLE of one annotation's segmentation: polygons (merged), uncompressed or compressed RLE.

    Polygons under three points are left out, as detectron2 does (pycocotools reads a first polygon of four
    numbers as a box and fails on fewer); without a polygon left, the mask is empty.
    """
    if isinstance(segmentation, list):
        segmentation = [polygon for polygon in segmentation if not is_short_polygon(polygon)]
        if not segmentation:
            return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return segmentation
    raise PipelineError(f"unsupported segmentation of type {type(segmentation).__name__} in the ground truth")
