"""Match proposals to ground-truth instances by mask IoU, the first step of the evaluation protocol.

A proposal is *matched* to the ground-truth instance of highest mask IoU in its image when that IoU is
>= the threshold (0.5; exactly 0.5 counts). Equal best IoUs go to the annotation listed first. IoU is
computed on compressed RLE by pycocotools (exact integer pixel counts, so a ratio that is exactly 0.5
compares as exactly 0.5). Every annotation is an ordinary instance: `iscrowd` is not looked at (LVIS has
no crowd regions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.geometry.masks import annotation_rle


@dataclass(frozen=True)
class Matches:
    """Per proposal, flat over all images: matched category id and annotation id (-1 when unmatched) and the
    best IoU with any ground-truth instance of its image (0 when the image has none; kept when below threshold)."""

    category: np.ndarray  # (N,) int64
    ann_id: np.ndarray  # (N,) int64
    iou: np.ndarray  # (N,) float64

    @property
    def matched(self) -> np.ndarray:
        return self.category >= 0

    def __len__(self) -> int:
        return len(self.category)


def _as_rles(proposals: np.ndarray | Sequence[dict]) -> list[dict]:
    if isinstance(proposals, np.ndarray):
        if proposals.ndim != 3:
            raise PipelineError(f"proposal masks must be (n, H, W), got shape {proposals.shape}")
        if len(proposals) == 0:
            return []
        return mask_utils.encode(np.asfortranarray(proposals.astype(np.uint8).transpose(1, 2, 0)))
    return list(proposals)


def match_image(
    proposals: np.ndarray | Sequence[dict],
    gt_annotations: Sequence[dict],
    image_hw: tuple[int, int],
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match one image's proposals ((n, H, W) bool masks or n compressed RLEs) to its annotations (LVIS dicts).

    Returns (category (n,), ann_id (n,), best iou (n,)); category and ann_id are -1 where best iou < threshold.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise PipelineError(f"matching IoU threshold must be in (0, 1], got {iou_threshold}")
    height, width = int(image_hw[0]), int(image_hw[1])
    dts = _as_rles(proposals)
    n = len(dts)
    category = np.full(n, -1, dtype=np.int64)
    ann_id = np.full(n, -1, dtype=np.int64)
    best_iou = np.zeros(n, dtype=np.float64)
    if n == 0 or len(gt_annotations) == 0:
        return category, ann_id, best_iou
    gts = [annotation_rle(ann["segmentation"], height, width) for ann in gt_annotations]
    for rle in dts:
        if tuple(rle["size"]) != (height, width):
            raise PipelineError(f"proposal mask size {tuple(rle['size'])} differs from the image's {(height, width)}")
    ious = np.asarray(mask_utils.iou(dts, gts, [0] * len(gts)), dtype=np.float64).reshape(n, len(gts))
    best = ious.argmax(axis=1)  # first maximum: equal IoUs go to the annotation listed first
    best_iou = ious[np.arange(n), best]
    hit = best_iou >= iou_threshold
    gt_category = np.array([ann["category_id"] for ann in gt_annotations], dtype=np.int64)
    gt_id = np.array([ann["id"] for ann in gt_annotations], dtype=np.int64)
    category[hit] = gt_category[best[hit]]
    ann_id[hit] = gt_id[best[hit]]
    return category, ann_id, best_iou


def match_proposals(
    proposals_per_image: Iterable[np.ndarray | Sequence[dict]],
    gt_annotations_per_image: Iterable[Sequence[dict]],
    image_hw: np.ndarray | Sequence[tuple[int, int]],
    iou_threshold: float = 0.5,
    *,
    progress: bool = False,
) -> Matches:
    """Match every image's proposals to its ground truth; the result is flat in image order."""
    categories, ann_ids, ious = [], [], []
    items = zip(proposals_per_image, gt_annotations_per_image, image_hw, strict=True)
    for proposals, gt_annotations, hw in tqdm(items, total=len(image_hw), desc="matching", disable=not progress):
        category, ann_id, iou = match_image(proposals, gt_annotations, (int(hw[0]), int(hw[1])), iou_threshold)
        categories.append(category)
        ann_ids.append(ann_id)
        ious.append(iou)
    if not categories:
        empty = np.zeros(0, dtype=np.int64)
        return Matches(empty, empty.copy(), np.zeros(0, dtype=np.float64))
    return Matches(np.concatenate(categories), np.concatenate(ann_ids), np.concatenate(ious))
