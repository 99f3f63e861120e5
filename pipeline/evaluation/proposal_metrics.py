"""Class-agnostic proposal quality: mask recall@k and AP at an IoU, for base, novel and all GT instances.

The `propose` stage's metrics (metrics/propose_<split>.json). Proposals come as a sequence of per-image
dicts (boxes, scores, masks as `pipeline.models.proposer.propose` returns them), which may be read lazily from a
store (`pipeline.stores.proposals.StoreProposals`): only one image's masks are pasted at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from pipeline.data.annotation_stream import AnnotationIndex, load_image_records
from pipeline.data.lvis_format import IMAGE_FIELDS
from pipeline.errors import PipelineError
from pipeline.geometry.masks import annotation_rle
from pipeline.geometry.paste import paste_masks


def _ap_101(tp: np.ndarray, n_pos: int) -> float:
    """COCO-style AP: 101-point interpolated precision over recall, from TP flags sorted by score."""
    if n_pos == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(1 - tp)
    recall = tp_cum / n_pos
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # envelope: best precision at recall >= r
    thresholds = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, thresholds, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def evaluate_proposals(
    proposals: list[dict],
    gt_json: Path,
    image_ids: list[int],
    base_category_ids: set[int],
    *,
    k: int = 20,
    iou: float = 0.5,
) -> dict:
    """Class-agnostic mask recall@k and AP at `iou` of proposals, for base, novel and all GT instances.

    `proposals[i]` (boxes, scores, masks as from `propose`) belongs to `image_ids[i]`; only the top `k`
    proposals (by score) of an image count. Masks are pasted at full resolution
    (`pipeline.geometry.paste.paste_masks`) and compared with pycocotools' mask IoU.
    - recall@k/S: fraction of GT instances of subset S covered by some proposal with IoU >= iou;
    - apXX/S: proposals sorted by score over all images, each greedily matched (COCO-style) to the
      unmatched GT instance of highest IoU >= iou among all categories; for subset S a match to S is a
      true positive, a match to another subset is ignored, no match is a false positive; 101-point AP.
    Crowd GT (COCO `iscrowd`) are not instances: a proposal whose intersection over its own area with
    a crowd region is >= iou is ignored instead of counted as a false positive.
    Undefined values (a subset with no GT) are NaN.
    """
    if len(proposals) != len(image_ids):
        raise PipelineError(f"evaluate_proposals: {len(proposals)} proposal sets for {len(image_ids)} images")
    gt_json = Path(gt_json)
    what = "ground-truth annotation file"
    wanted = {int(i) for i in image_ids}
    try:
        images = {int(img["id"]): img for img in load_image_records(gt_json, what, IMAGE_FIELDS)}
        # no outline: not an instance; the split's annotations wait on disk, indexed by image
        anns_by_image = AnnotationIndex(
            gt_json, what, lambda ann: ann if int(ann["image_id"]) in wanted and ann.get("segmentation") else None
        )
    except (KeyError, TypeError, ValueError) as err:
        raise PipelineError(f"{gt_json}: not a COCO/LVIS annotation file (bad or missing field {err})") from None
    base = {int(c) for c in base_category_ids}
    subsets = ("base", "novel", "all")
    n_gt = dict.fromkeys(subsets, 0)
    covered = dict.fromkeys(subsets, 0)
    det_scores: list[np.ndarray] = []
    det_match: list[np.ndarray] = []  # per detection: -1 false positive, -2 ignored, 0 base TP, 1 novel TP
    for props, image_id in zip(proposals, image_ids, strict=True):
        image_id = int(image_id)
        if image_id not in images:
            raise PipelineError(f"{gt_json}: image id {image_id} not found")
        height, width = int(images[image_id]["height"]), int(images[image_id]["width"])
        anns = anns_by_image[image_id]
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        is_base = np.array([int(a["category_id"]) in base for a in anns], dtype=bool)
        gt_rles = [annotation_rle(a["segmentation"], height, width) for a in anns]
        n_inst = int((~crowd).sum())
        n_base = int((~crowd & is_base).sum())
        n_gt["all"] += n_inst
        n_gt["base"] += n_base
        n_gt["novel"] += n_inst - n_base
        scores = np.asarray(props["scores"], dtype=np.float64).reshape(-1)
        order = np.argsort(-scores, kind="stable")[:k]
        scores = scores[order]
        if len(order) == 0:
            continue
        pasted = paste_masks(np.asarray(props["masks"])[order], np.asarray(props["boxes"])[order], (height, width))
        dt_rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in pasted]
        if anns:
            ious = np.asarray(mask_utils.iou(dt_rles, gt_rles, crowd.astype(np.uint8).tolist()), dtype=np.float64)
            ious = ious.reshape(len(dt_rles), len(gt_rles))
        else:
            ious = np.zeros((len(dt_rles), 0))
        hit = (ious[:, ~crowd] >= iou).any(axis=0)
        covered["all"] += int(hit.sum())
        covered["base"] += int((hit & is_base[~crowd]).sum())
        covered["novel"] += int((hit & ~is_base[~crowd]).sum())
        taken = np.zeros(len(anns), dtype=bool)
        match = np.full(len(order), -1, dtype=np.int64)
        for d in range(len(order)):  # already in descending score order
            candidates = np.where(~crowd & ~taken & (ious[d] >= iou))[0]
            if len(candidates):
                g = candidates[np.argmax(ious[d, candidates])]
                taken[g] = True
                match[d] = 0 if is_base[g] else 1
            elif (crowd & (ious[d] >= iou)).any():
                match[d] = -2
        det_scores.append(scores)
        det_match.append(match)
    scores_all = np.concatenate(det_scores) if det_scores else np.zeros(0)
    match_all = np.concatenate(det_match) if det_match else np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores_all, kind="stable")
    match_all = match_all[order]
    ap_key = f"ap{int(round(iou * 100))}"
    result: dict[str, float | int] = {}
    for subset in subsets:
        wanted = {"base": (0,), "novel": (1,), "all": (0, 1)}[subset]
        is_tp = np.isin(match_all, wanted)
        counted = is_tp | (match_all == -1)
        result[f"recall@{k}/{subset}"] = covered[subset] / n_gt[subset] if n_gt[subset] else float("nan")
        result[f"{ap_key}/{subset}"] = _ap_101(is_tp[counted].astype(np.float64), n_gt[subset])
        result[f"n_gt/{subset}"] = n_gt[subset]
    result["n_images"] = len(image_ids)
    result["n_proposals"] = len(match_all)
    return result
