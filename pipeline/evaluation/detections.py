"""Proposals to LVIS detections: full-resolution masks as compressed RLE, one detection per labelled proposal.

A detection is {image_id, category_id, segmentation (compressed RLE, `counts` as str), score}; there is no
`bbox` field, so LVIS takes areas from the mask. Each image keeps at most `max_per_image` detections, the
highest-scoring ones (equal scores keep proposal order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.evaluation.cluster_maps import labels_from_map
from pipeline.geometry.paste import paste_masks

READ_BLOCK = 4096  # proposals read at once from a (possibly on-disk, chunked) masks array


def check_offsets(image_offsets: np.ndarray, n_images: int, n_proposals: int) -> np.ndarray:
    """`image_offsets` as int64, checked: n_images + 1 entries, from 0 to n_proposals, non-decreasing."""
    offsets = np.asarray(image_offsets, dtype=np.int64)
    if (
        offsets.shape != (n_images + 1,)
        or offsets[0] != 0
        or offsets[-1] != n_proposals
        or np.any(np.diff(offsets) < 0)
    ):
        raise PipelineError(
            f"image_offsets must run non-decreasing from 0 to {n_proposals} over {n_images + 1} entries"
        )
    return offsets


def image_rles(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]) -> list[dict]:
    """Compressed RLEs (str counts) of one image's proposals, pasted at full resolution (`paste_masks`)."""
    height, width = int(image_hw[0]), int(image_hw[1])
    if len(masks) == 0:
        return []
    pasted = paste_masks(np.asarray(masks), np.asarray(boxes), (height, width))
    rles = mask_utils.encode(np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def proposal_rles(
    image_offsets: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    image_hw: np.ndarray,
    *,
    progress: bool = False,
) -> list[dict]:
    """Full-resolution compressed RLE of every proposal, flat in store order.

    `boxes` (N, 4) xyxy and `masks` (N, M, M) may be array-likes read lazily (e.g. Zarr arrays): they are read
    in blocks of about READ_BLOCK proposals aligned to image boundaries.
    """
    image_hw = np.asarray(image_hw)
    n_boxes, n_masks = int(np.shape(boxes)[0]), int(np.shape(masks)[0])
    offsets = check_offsets(image_offsets, len(image_hw), n_boxes)
    if n_masks != n_boxes:
        raise PipelineError(f"{n_masks} masks for {n_boxes} boxes")
    out: list[dict] = []
    start, stop = 0, 0
    block_boxes = block_masks = None
    for i in tqdm(range(len(image_hw)), desc="pasting masks", disable=not progress):
        s, e = int(offsets[i]), int(offsets[i + 1])
        if e > stop:
            start, stop = s, max(e, min(s + READ_BLOCK, int(offsets[-1])))
            block_boxes, block_masks = np.asarray(boxes[start:stop]), np.asarray(masks[start:stop])
        if e > s:
            out.extend(image_rles(block_masks[s - start : e - start], block_boxes[s - start : e - start], image_hw[i]))
    return out


def build_detections(
    image_ids: Sequence[int],
    image_offsets: np.ndarray,
    scores: np.ndarray,
    rles: Sequence[dict],
    labels: np.ndarray,
    *,
    max_per_image: int = 300,
) -> list[dict]:
    """One detection per proposal with a label (category id; -1 = none), at most `max_per_image` per image."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    offsets = check_offsets(image_offsets, len(image_ids), len(scores))
    if not len(rles) == len(labels) == len(scores):
        raise PipelineError(f"{len(rles)} masks, {len(labels)} labels and {len(scores)} scores do not match")
    if max_per_image < 1:
        raise PipelineError(f"at most {max_per_image} detections per image leaves nothing to score")
    detections = []
    for i, image_id in enumerate(image_ids):
        s, e = int(offsets[i]), int(offsets[i + 1])
        rows = s + np.flatnonzero(labels[s:e] >= 0)
        rows = rows[np.argsort(-scores[rows], kind="stable")][:max_per_image]
        for r in rows:
            detections.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(labels[r]),
                    "segmentation": rles[r],
                    "score": float(scores[r]),
                }
            )
    return detections


def cluster_detections(
    image_ids: Sequence[int],
    image_offsets: np.ndarray,
    scores: np.ndarray,
    rles: Sequence[dict],
    assignment: np.ndarray,
    cluster_to_category: Mapping[int, int],
    *,
    max_per_image: int = 300,
) -> list[dict]:
    """Every proposal of a mapped cluster becomes a detection of its cluster's category."""
    labels = labels_from_map(assignment, cluster_to_category)
    return build_detections(image_ids, image_offsets, scores, rles, labels, max_per_image=max_per_image)


def oracle_detections(
    image_ids: Sequence[int],
    image_offsets: np.ndarray,
    scores: np.ndarray,
    rles: Sequence[dict],
    matched_category: np.ndarray,
    *,
    max_per_image: int = 300,
) -> list[dict]:
    """Every matched proposal labelled with its own matched ground-truth category (the clustering upper bound)."""
    return build_detections(image_ids, image_offsets, scores, rles, matched_category, max_per_image=max_per_image)
