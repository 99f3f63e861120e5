"""LVIS mask AP with faster-coco-eval's C++ evaluator in LVIS mode: LVISEval's numbers, without its Python loops.

`run_lvis_eval(..., backend="faster_coco_eval")` (pipeline/evaluation/lvis_eval.py) validates and caps the
detections, then calls `faster_lvis_metrics` here. What it takes to give exactly the numbers of lvis 0.5.3's
LVISEval (checked in faster-coco-eval 1.8.0's source, and by tests/evaluation/test_faster_eval.py):

- Ground truth: LVIS reads only annotations of area > 0 (`LVIS.get_ann_ids`) and treats each as an ordinary
  instance: it never looks at `iscrowd`, and ignores one only if it carries `ignore`. faster-coco-eval takes
  `iscrowd` for a crowd region (matched many times, IoU over the detection's area) and overwrites `ignore`
  with it. It gets copies with `iscrowd` 0 and without the area-0 annotations; an annotation carrying a true
  `ignore` is refused (faster-coco-eval cannot ignore a non-crowd annotation; LVIS v1 has no such field).
- Detections: LVIS drops those of mask area 0 (`get_ann_ids` on the results); so does this. Ids are the
  position in the capped list plus 1, as `LVISResults` numbers them.
- Federated rules (both evaluators): a detection whose category is neither annotated in its image nor in the
  image's `neg_category_ids` is dropped; an unmatched one of a category in the image's
  `not_exhaustive_category_ids` is ignored (faster-coco-eval's `lvis_mark`). The drop is applied here, before
  faster-coco-eval sees the detections: its `_prepare` (1.8.0) rasterises the detections it drops as well and
  fails (`IndexError: unordered_map::at`) on an image where nothing else gave it the image's size.
- Matching and accumulation are LVIS's: greedy by score (stable sorts), ground truth outside the area range
  ignored, unmatched detections outside it ignored, recall thresholds 0:.01:1, area ranges 0/32²/96²/1e5²,
  precision -1 for a category without ground truth; the summary is LVISEval's `_summarize` (here).
- One arithmetic difference, corrected here: LVIS's precision is tp / (tp + fp + eps) (eps = np.spacing(1)),
  faster-coco-eval's tp / (tp + fp). For tp + fp >= 2 the two are the same double (n + eps rounds to n); at
  tp = 1, fp = 0 LVIS has 1 / (1 + eps) = 1 - 2^-52 (`ONE_AFTER_ONE`). After interpolation (the maximum
  to the right) that value survives exactly where a precision-recall curve's first counted detection is a true
  positive and its second is not (a false positive, or none): then every 1.0 of faster-coco-eval's curve is
  1 - 2^-52 in LVIS's. A curve's precision at recall 0 is 1 iff its first counted detection is a true
  positive; the evaluator also samples each curve of n >= 2 counted ground truths at recall 1.5 / n, where the
  precision is 1 iff the second true positive comes before any false positive; the curves with the first and
  not the second are set to LVIS's value. The precision array, and so every metric, is then LVISEval's to the
  bit (without this, one of the 27 default-run numbers differed, by 6e-17).
- Memory: faster-coco-eval's `evaluate` lists every (image, category) pair of the evaluation in Python
  (a tuple, a dict entry and an empty list each) and its C++ keeps one `ImageEvaluation` (six vectors, ~176
  bytes) per (image, category, area range): 24 M pairs and 95 M results on LVIS v1 val (19,809 images x
  1,203 categories), ~1.15 GB per 1,000 images measured (`benchmarks/bench_eval.py --backends stock`), ~23 GB
  projected. A category's precision depends only on the pairs of images where it has ground truth or
  detections (every other pair holds nothing), so the evaluator runs on groups of categories, each on the
  images where they have any, at most `cells` (image, category) pairs per group (most groups are one
  category); the per-category precision is gathered into one array and summarised here. At LVIS v1 val size
  that is 0.8 GB over the loaded data (LVISEval: 2.7 GB) and 3.5x less time (README, "Benchmarks").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from lvis import LVIS

CELLS = 1 << 10  # (image, category) pairs per evaluator call (more: more empty pairs evaluated, no faster)
AREA_RANGES = {"small": [0**2, 32**2], "medium": [32**2, 96**2], "large": [96**2, 1e5**2]}  # LVISEval's
FREQUENCIES = ("r", "c", "f")
ONE_AFTER_ONE = 1.0 / (1.0 + np.spacing(1))  # LVISEval's precision tp / (tp + fp + eps) at tp = 1, fp = 0


def _silent(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval prints each summary line through its print_function; nothing is printed here."""


def _ground_truth(gt: LVIS, image_ids: Sequence[int]) -> list[dict]:
    """Copies of the annotations LVISEval reads (area > 0) on `image_ids`, as ordinary (non-crowd) instances."""
    out = []
    for image_id in image_ids:
        for ann in gt.img_ann_map[image_id]:
            if ann.get("ignore"):
                raise PipelineError(
                    f"annotation {ann.get('id')} is marked 'ignore': LVISEval honours that, faster-coco-eval "
                    "cannot; use evaluate.backend: lvis"
                )
            if ann["area"] > 0:
                out.append({**ann, "iscrowd": 0})
    return out


def _kept_detections(detections: list[dict], gt: LVIS, present: dict[int, set[int]], images: set[int]) -> list[dict]:
    """The detections LVISEval scores: on `images`, of mask area > 0, of a category annotated in the image or
    in its negative list (federated). They get LVISResults' `id` (position + 1), `area` and `iscrowd` 0."""
    from faster_coco_eval.core import mask as mask_utils

    areas = mask_utils.area([det["segmentation"] for det in detections]) if detections else []
    kept = []
    for index, (det, area) in enumerate(zip(detections, areas, strict=True)):
        image_id, category_id = det["image_id"], det["category_id"]
        if image_id not in images or area <= 0:
            continue
        if category_id not in present[image_id] and category_id not in gt.imgs[image_id]["neg_category_ids"]:
            continue
        kept.append({**det, "id": index + 1, "area": float(area), "iscrowd": 0})
    return kept


def _groups(cells_of: dict[int, set[int]], cells: int) -> list[tuple[list[int], list[int]]]:
    """Categories (in id order) in groups of at most `cells` (image, category) pairs: (category ids, image ids).

    A group holds one category at least, however many images it has.
    """
    groups, cats, images = [], [], set()
    for cat in sorted(cells_of):
        new = cells_of[cat] - images
        if cats and (len(images) + len(new)) * (len(cats) + 1) > cells:
            groups.append((cats, sorted(images)))
            cats, images, new = [], set(), cells_of[cat]
        cats.append(cat)
        images |= new
    if cats:
        groups.append((cats, sorted(images)))
    return groups


def _summarize(precision: np.ndarray, iou_thrs: np.ndarray, freq_groups: list[list[int]]) -> dict[str, float]:
    """LVISEval._summarize of a precision array [iou threshold, recall threshold, category, area range]."""

    def mean(s: np.ndarray) -> float:
        s = s[s > -1]
        return -1.0 if s.size == 0 else float(np.mean(s))

    def at(thr: float) -> np.ndarray:
        return precision[np.where(thr == iou_thrs)[0]]

    out = {
        "AP": mean(precision[:, :, :, 0]),
        "AP50": mean(at(0.50)[:, :, :, 0]),
        "AP75": mean(at(0.75)[:, :, :, 0]),
        "APs": mean(precision[:, :, :, 1]),
        "APm": mean(precision[:, :, :, 2]),
        "APl": mean(precision[:, :, :, 3]),
    }
    for label, group in zip(FREQUENCIES, freq_groups, strict=True):
        out[f"AP{label}"] = mean(precision[:, :, group, 0])
    return out


def faster_lvis_metrics(
    gt: LVIS,
    detections: list[dict],
    *,
    max_dets: int,
    image_ids: Sequence[int] | None = None,
    cells: int = CELLS,
) -> dict[str, float]:
    """LVISEval's nine metrics (AP, AP50, AP75, APs, APm, APl, APr, APc, APf; -1 where undefined) of
    detections {image_id, category_id, segmentation (compressed RLE), score}, already capped per image and
    checked by run_lvis_eval, computed by faster-coco-eval (LVIS mode), `cells` pairs per call at most."""
    from faster_coco_eval import COCO, COCOeval_faster

    image_ids = sorted({int(i) for i in gt.imgs}) if image_ids is None else sorted({int(i) for i in image_ids})
    categories = sorted(gt.dataset["categories"], key=lambda c: c["id"])
    column = {cat["id"]: k for k, cat in enumerate(categories)}
    gts = [ann for ann in _ground_truth(gt, image_ids) if ann["category_id"] in column]
    present: dict[int, set[int]] = defaultdict(set)
    cells_of: dict[int, set[int]] = defaultdict(set)  # category -> images where it has ground truth or detections
    for ann in gts:
        present[ann["image_id"]].add(ann["category_id"])
        cells_of[ann["category_id"]].add(ann["image_id"])
    dts = [d for d in _kept_detections(detections, gt, present, set(image_ids)) if d["category_id"] in cells_of]
    for det in dts:  # a category without ground truth has no precision (-1), whatever its detections
        cells_of[det["category_id"]].add(det["image_id"])

    gt_by_cat: dict[int, list[dict]] = defaultdict(list)
    dt_by_cat: dict[int, list[dict]] = defaultdict(list)
    for ann in gts:
        gt_by_cat[ann["category_id"]].append(ann)
    for det in dts:
        dt_by_cat[det["category_id"]].append(det)

    probe = COCOeval_faster(iouType="segm", ranges=AREA_RANGES, lvis_style=True, print_function=_silent).params
    iou_thrs, rec_thrs, area_rng = np.asarray(probe.iouThrs), np.asarray(probe.recThrs), probe.areaRng
    precision = -np.ones((len(iou_thrs), len(rec_thrs), len(categories), len(area_rng)))
    for cats, images in _groups(cells_of, cells):
        records = [gt.imgs[i] for i in images]
        data = {"images": records, "categories": [categories[column[c]] for c in cats]}
        coco_gt = COCO({**data, "annotations": [a for c in cats for a in gt_by_cat[c]]}, print_function=_silent)
        coco_dt = COCO({**data, "annotations": [d for c in cats for d in dt_by_cat[c]]}, print_function=_silent)
        evaluator = COCOeval_faster(
            coco_gt,
            coco_dt,
            iouType="segm",
            ranges=AREA_RANGES,
            lvis_style=True,
            print_function=_silent,
            rle_iou_max_workers=1,  # one thread: a group's IoUs take microseconds, a thread pool's hand-offs more
        )
        n_gt = np.array([[sum(lo <= a["area"] <= hi for a in gt_by_cat[c]) for lo, hi in area_rng] for c in cats])
        second = sorted({int(n) for n in n_gt.flat if n >= 2})  # 1.5 / n: the recall of a second true positive
        evaluator.params.imgIds = images
        evaluator.params.catIds = cats
        evaluator.params.maxDets = [max_dets]
        evaluator.params.recThrs = np.concatenate([rec_thrs, [1.5 / n for n in second]])
        evaluator.evaluate()
        evaluator.accumulate()
        sampled = np.asarray(evaluator.eval["precision"])[..., -1]  # [iou, recall, category, area]
        at_second = {n: len(rec_thrs) + i for i, n in enumerate(second)}
        group = sampled[:, : len(rec_thrs)]
        for k, a in np.ndindex(n_gt.shape):
            for t in range(len(iou_thrs)):
                second_tp = sampled[t, at_second[n_gt[k, a]], k, a] if n_gt[k, a] >= 2 else 0.0
                if group[t, 0, k, a] == 1.0 and second_tp < 1.0:  # a true positive first, then a false positive
                    curve = group[t, :, k, a]
                    curve[curve == 1.0] = ONE_AFTER_ONE
        precision[:, :, [column[c] for c in cats], :] = group

    freq_groups = [[k for k, cat in enumerate(categories) if cat["frequency"] == f] for f in FREQUENCIES]
    return _summarize(precision, iou_thrs, freq_groups)
