"""Instance masks: paste box-relative mask-head output into the image, RLE encoding, pairwise IoU.

A proposal's mask is stored as the mask head's native M x M probability map, relative to its box.
The full-resolution mask is the deterministic paste of that map into the box (torchvision's own
`paste_masks_in_image`, the function Mask R-CNN uses), thresholded at 0.5.
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from pipeline.errors import PipelineError


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Paste (n, M, M) box-relative probability maps (float or uint8 in 0..255) into (n, H, W) bool masks."""
    n = len(masks)
    height, width = int(image_hw[0]), int(image_hw[1])
    if n == 0:
        return np.zeros((0, height, width), dtype=bool)
    probs = torch.as_tensor(np.asarray(masks))
    probs = probs.float() / 255.0 if probs.dtype == torch.uint8 else probs.float()
    pasted = paste_masks_in_image(
        probs[:, None], torch.as_tensor(np.asarray(boxes), dtype=torch.float32), (height, width)
    )
    return (pasted[:, 0] >= threshold).numpy()


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


def annotation_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Compressed RLE of one annotation's segmentation: polygons (merged), uncompressed or compressed RLE."""
    if isinstance(segmentation, list):
        if not segmentation:
            return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return segmentation
    raise PipelineError(f"unsupported segmentation of type {type(segmentation).__name__} in the ground truth")
