"""Pair rules between the mask proposals of one image: same object (IoU) and part-of (containment).

All rules are computed at once for every pair of one image from two integer quantities, obtained by a
single matrix product of the flattened masks (no Python loop over pairs):

    inter[i, j] = |m_i ∩ m_j|        area[i] = |m_i|

Rules (indices are image-local, rows of the `masks` argument):

* object pair ``(i, j)``, ``i < j``: ``IoU(i, j) = inter / (area_i + area_j - inter) > iou_thresh``
  (strictly greater, as the paper's "IoU > 0.4"). Identical non-empty masks are an object pair.
* hierarchy pair ``(parent, child)``: ``area[child] < area[parent]`` (strictly: equal areas are never a
  hierarchy pair, whatever their overlap — identical masks are the same object, not parent and child) and
  ``inter[parent, child] / area[child] >= containment``. With ``containment = 1`` this is the released
  code's rule (child fully inside a strictly larger parent).
* empty masks (area 0) are never in any pair.
* the two rules are independent by default, as in the authors' released code: a small mask fully inside
  a larger one with IoU above the object threshold (e.g. half of it) is both an object pair and a
  hierarchy pair, so L_object pulls the two together while L_hier orders their norms. Pass
  ``max_iou`` to :func:`hier_pairs` (or ``exclusive=True`` to :func:`relations` / :func:`image_relations`)
  to keep only hierarchy pairs whose IoU is at most the object threshold, making the two sets disjoint.

Device: masks given as a torch tensor on a GPU (the paste's output in `sample`) are counted there, by the
same one product in float32 (or float64), exact whatever the matmul precision setting (0/1 inputs are exact in
TF32 and every sum is an integer below 2**24); only the (n, n) counts come back. A CPU tensor or an array is
counted by numpy.

Resolution: relations are exact on the full-resolution masks. For speed, ``max_side`` downscales the
masks first so that the longer side is at most ``max_side``, by an integer factor with "any pixel" pooling
(a block is set when any of its pixels is). Any-pixel pooling is monotone, so full containment survives
it; areas grow (thin masks most), so IoU and partial containment are approximations, and a strict area
order may become a tie (then the pair is dropped).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.geometry.paste import paste_masks

_EXACT_FLOAT32 = 2**24  # float32 represents every integer up to 2**24 exactly

__all__ = [
    "downscale",
    "downscale_factor",
    "hier_pairs",
    "image_relations",
    "object_pairs",
    "pair_stats",
    "relations",
]


def _as_masks(masks: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(masks, torch.Tensor):
        if masks.ndim != 3:
            raise PipelineError(f"relations: expected masks of shape (n, H, W), got shape {tuple(masks.shape)}")
        return masks.bool()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise PipelineError(f"relations: expected masks of shape (n, H, W), got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def _empty_pairs() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


def pair_stats(masks: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise intersections (n, n) int64 and areas (n,) int64 of (n, H, W) bool masks, by one matmul.

    The product runs in float32 when H * W <= 2**24 (every partial sum is an integer below 2**24, so the
    result is exact) and in float64 otherwise (exact up to 2**53 pixels).
    """
    masks = _as_masks(masks)
    n = len(masks)
    if isinstance(masks, torch.Tensor):
        if masks.device.type != "cpu":
            return _pair_stats_torch(masks)
        masks = masks.numpy()
    flat = masks.reshape(n, masks.shape[1] * masks.shape[2])
    dtype = np.float32 if flat.shape[1] <= _EXACT_FLOAT32 else np.float64
    flat_f = flat.astype(dtype)
    inter = np.rint(flat_f @ flat_f.T).astype(np.int64)
    area = flat.sum(axis=1, dtype=np.int64)
    return inter, area


def _pair_stats_torch(masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """`pair_stats` of (n, H, W) bool masks on their device (a GPU); the counts come back as numpy int64."""
    flat = masks.reshape(len(masks), -1)
    dtype = torch.float32 if flat.shape[1] <= _EXACT_FLOAT32 else torch.float64
    with torch.autocast(flat.device.type, enabled=False):
        flat_f = flat.to(dtype)
        inter = torch.round(flat_f @ flat_f.T).to(torch.int64)
    area = flat.sum(dim=1, dtype=torch.int64)
    return inter.cpu().numpy(), area.cpu().numpy()


def _iou(inter: np.ndarray, area: np.ndarray) -> np.ndarray:
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape, dtype=np.float64), where=union > 0)


def _check_iou(iou_thresh: float) -> None:
    if not 0.0 <= iou_thresh < 1.0:
        raise PipelineError(f"relations: object IoU threshold must be in [0, 1), got {iou_thresh}")


def _check_containment(containment: float) -> None:
    if not 0.0 < containment <= 1.0:
        raise PipelineError(f"relations: hierarchy containment must be in (0, 1], got {containment}")


def _object_from_stats(inter: np.ndarray, area: np.ndarray, iou_thresh: float) -> np.ndarray:
    _check_iou(iou_thresh)
    nonempty = area > 0
    keep = (_iou(inter, area) > iou_thresh) & nonempty[:, None] & nonempty[None, :]
    keep = np.triu(keep, k=1)
    return np.argwhere(keep).astype(np.int64).reshape(-1, 2)


def _hier_from_stats(
    inter: np.ndarray, area: np.ndarray, containment: float, max_iou: float | None = None
) -> np.ndarray:
    _check_containment(containment)
    # keep[p, c]: row = parent, column = child
    ratio = np.divide(inter, area[None, :], out=np.zeros(inter.shape, dtype=np.float64), where=area[None, :] > 0)
    keep = (area[None, :] > 0) & (area[None, :] < area[:, None]) & (ratio >= containment)
    if max_iou is not None:
        keep &= _iou(inter, area) <= max_iou
    return np.argwhere(keep).astype(np.int64).reshape(-1, 2)


def object_pairs(masks: np.ndarray, iou_thresh: float = 0.4) -> np.ndarray:
    """Unordered pairs (P, 2) int64, ``i < j``, of non-empty masks with IoU > `iou_thresh`, row-major order."""
    inter, area = pair_stats(masks)
    return _object_from_stats(inter, area, iou_thresh)


def hier_pairs(masks: np.ndarray, containment: float = 0.95, *, max_iou: float | None = None) -> np.ndarray:
    """(parent, child) pairs (Q, 2) int64: area(child) < area(parent), inter / area(child) >= containment.

    Empty masks and equal areas never pair. With `max_iou`, pairs whose IoU exceeds it are dropped (pass the
    object threshold to make hierarchy and object pairs disjoint). Sorted by parent, then child.
    """
    inter, area = pair_stats(masks)
    return _hier_from_stats(inter, area, containment, max_iou)


def downscale_factor(image_hw: tuple[int, int], max_side: int | None) -> int:
    """Smallest integer factor f with ceil(max(H, W) / f) <= max_side (1 when max_side is None)."""
    if max_side is None:
        return 1
    if max_side < 1:
        raise PipelineError(f"relations: max_side must be a positive integer or null, got {max_side}")
    return max(1, math.ceil(max(int(image_hw[0]), int(image_hw[1])) / max_side))


def downscale(masks: np.ndarray | torch.Tensor, factor: int) -> np.ndarray | torch.Tensor:
    """Any-pixel pooling of (n, H, W) bool masks by an integer `factor` -> (n, ceil(H/f), ceil(W/f)) bool."""
    masks = _as_masks(masks)
    factor = int(factor)
    if factor < 1:
        raise PipelineError(f"relations: downscale factor must be >= 1, got {factor}")
    if factor == 1:
        return masks
    n, height, width = masks.shape
    out_h, out_w = -(-height // factor), -(-width // factor)
    if isinstance(masks, torch.Tensor):
        padded = torch.zeros((n, out_h * factor, out_w * factor), dtype=torch.bool, device=masks.device)
        padded[:, :height, :width] = masks
        return padded.reshape(n, out_h, factor, out_w, factor).any(dim=4).any(dim=2)
    padded = np.zeros((n, out_h * factor, out_w * factor), dtype=bool)
    padded[:, :height, :width] = masks
    return padded.reshape(n, out_h, factor, out_w, factor).any(axis=(2, 4))


def relations(
    full_masks: np.ndarray | torch.Tensor,
    *,
    object_iou: float,
    hier_containment: float,
    max_side: int | None = None,
    exclusive: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(object_pairs (P, 2), hier_pairs (Q, 2)) of already-pasted (n, H, W) masks; one matmul for both rules."""
    full_masks = _as_masks(full_masks)
    masks = downscale(full_masks, downscale_factor(full_masks.shape[1:], max_side))
    inter, area = pair_stats(masks)
    obj = _object_from_stats(inter, area, object_iou)
    hier = _hier_from_stats(inter, area, hier_containment, object_iou if exclusive else None)
    return obj, hier


def image_relations(
    masks_mxm: np.ndarray,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    *,
    object_iou: float,
    hier_containment: float,
    max_side: int | None = None,
    exclusive: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of one image's proposals, in image-local indices, from the mask head's M x M maps.

    Pastes the masks into the image (:func:`pipeline.geometry.paste.paste_masks`, threshold 0.5) and applies
    :func:`relations`. Callers that also need the full masks (feature crops) should paste once and call
    :func:`relations` directly.
    """
    if len(masks_mxm) == 0:
        return _empty_pairs(), _empty_pairs()
    full = paste_masks(masks_mxm, boxes, image_hw)
    return relations(
        full, object_iou=object_iou, hier_containment=hier_containment, max_side=max_side, exclusive=exclusive
    )
