"""LVIS mask AP (segm): the `lvis` package's own LVISEval, with the fixes lvis 0.5.3 needs, or faster-coco-eval.

`run_lvis_eval` scores with either backend (`BACKENDS`, params `evaluate.backend`): "faster_coco_eval", the
default, is faster-coco-eval's C++ evaluator in LVIS mode, driven so that it gives LVISEval's numbers to the bit
(pipeline/evaluation/faster_eval.py says how); "lvis" is LVISEval itself, pure Python (slow at LVIS size).

What the integrator should know about lvis 0.5.3 (checked in its source):
- `LVISEval.accumulate` calls `np.float`, removed in numpy 1.24; `_numpy_float_shim` restores the alias.
- `LVISResults` reads `results[0]` (crashes on an empty list) and decides from the *first* detection whether
  results are boxes: when it has a `bbox`, every area becomes w * h of the box. Detections here carry no
  `bbox` (any is dropped), so LVIS computes area (for APs/APm/APl) and bbox from the mask itself.
- `LVISResults` writes `area`, `bbox` and `id` into the result dicts, so it gets copies; it also deep-copies
  the ground truth's dataset, so it gets a ground truth reduced to images and categories.
- Federated protocol: a detection whose category is neither annotated in its image nor in the image's
  `neg_category_ids` is discarded; an unmatched one of a category in `not_exhaustive_category_ids` is ignored.
- Empty detections (area 0) and ground truth with `area` 0 are silently dropped by `get_ann_ids`.
- `LVISEval.evaluate` keeps three dict entries for every (image, category) pair, empty ones included
  (about 10 GB on LVIS v1 val); `_lean_lvis_eval` gives the same results without them.
- A metric with no category holding ground truth in its group (e.g. APr without any rare category) is -1
  in LVIS; it is reported here as None (JSON null), consistently, never as -1.
- `import lvis` runs `logging.basicConfig(level=WARN)` on the root logger and imports cv2 and matplotlib.pyplot
  (about 1 s). It is therefore imported lazily, on first use, and the root logger's handlers and level are put
  back as they were, so the application's own logging set-up still applies.
LVIS logs through the standard `logging` loggers `lvis.*`; they are held at ERROR while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from lvis import LVIS, LVISResults

METRIC_KEYS = ("AP", "AP50", "AP75", "APr", "APc", "APf", "APs", "APm", "APl")
BACKENDS = ("faster_coco_eval", "lvis")  # params.yaml evaluate.backend; the first is the default


def _lvis():
    """The lvis package, imported with the root logger's configuration preserved (see the module doc)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import lvis

    root.handlers[:] = handlers
    root.setLevel(level)
    return lvis


def _numpy_float_shim() -> None:
    # lvis 0.5.3 (its last release) calls `np.float` in LVISEval.accumulate; numpy removed that alias in 1.24.
    # It always meant the builtin float, so restore exactly that, and only when it is missing.
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]


@contextlib.contextmanager
def _quiet_lvis() -> Iterator[None]:
    """Hold LVIS's chatter (info lines, a 'results in correct format' warning, Logger.warn deprecation) back."""
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def load_lvis(gt_json: Path | str) -> LVIS:
    """Load an LVIS-format ground truth (v1: images carry neg/not-exhaustive lists, categories a frequency)."""
    path = Path(gt_json)
    if not path.is_file():
        raise PipelineError(f"ground-truth annotations not found: {path}")
    with _quiet_lvis():
        try:
            gt = _lvis().LVIS(str(path))
        except (ValueError, KeyError, AssertionError) as exc:
            raise PipelineError(f"cannot read LVIS annotations {path}: {exc}") from exc
    check_lvis(gt, str(path))
    return gt


def check_lvis(gt: LVIS, name: str = "ground truth") -> None:
    """The fields LVISEval relies on without checking them."""
    for img in gt.dataset["images"]:
        for key in ("height", "width", "neg_category_ids", "not_exhaustive_category_ids"):
            if key not in img:
                raise PipelineError(f"{name}: image {img.get('id')} has no '{key}' (not an LVIS v1 file?)")
    for cat in gt.dataset["categories"]:
        if cat.get("frequency") not in ("r", "c", "f"):
            raise PipelineError(f"{name}: category {cat.get('id')} has no LVIS frequency r/c/f")


def cap_per_image(detections: Iterable[dict], max_per_image: int) -> list[dict]:
    """Keep each image's `max_per_image` highest-scoring detections (stable: equal scores keep their order)."""
    per_image: dict[int, list[dict]] = defaultdict(list)
    for det in detections:
        per_image[det["image_id"]].append(det)
    out = []
    for dets in per_image.values():
        if len(dets) > max_per_image:
            dets = sorted(dets, key=lambda d: -d["score"])[:max_per_image]
        out.extend(dets)
    return out


def _lean_lvis_eval():
    """LVISEval without the per-(image, category) bookkeeping of pairs that hold nothing (same results).

    lvis 0.5.3's `evaluate` computes IoUs for every (image, category) pair, and its `_get_gt_dt` reads
    `self._gts[img, cat]` and `self._dts[img, cat]`, defaultdicts that insert an empty list for every pair
    looked up. Three dict entries (tuple key, empty list) per pair, ~0.43 KB: 0.5 MB per image with LVIS's
    1,203 categories, ~10 GB on the 19,809 LVIS v1 val images (`benchmarks/bench_memory.py`). Here a
    missing pair is read without being inserted, and IoUs are computed only for the pairs that hold ground
    truth or detections, the only ones `evaluate_img` reads. `eval_imgs` keeps its layout (one slot per
    category, area range and image: 8 bytes each), which `accumulate` indexes.
    """
    lvis = _lvis()

    class LeanLVISEval(lvis.LVISEval):
        def _get_gt_dt(self, img_id, cat_id):
            if not self.params.use_cats:
                return super()._get_gt_dt(img_id, cat_id)
            return self._gts.get((img_id, cat_id), []), self._dts.get((img_id, cat_id), [])

        def evaluate(self):
            if not self.params.use_cats:
                return super().evaluate()
            self.params.img_ids = list(np.unique(self.params.img_ids))
            self._prepare()
            self.ious = {pair: self.compute_iou(*pair) for pair in set(self._gts) | set(self._dts)}
            self.eval_imgs = [
                self.evaluate_img(img_id, cat_id, area_rng)
                for cat_id in self.params.cat_ids
                for area_rng in self.params.area_rng
                for img_id in self.params.img_ids
            ]

    return LeanLVISEval


def _results(gt: LVIS, detections: list[dict], max_dets: int) -> LVISResults:
    lvis = _lvis()
    light = lvis.LVIS.__new__(
        lvis.LVIS
    )  # images and categories only: LVISResults deep-copies this and replaces annotations
    light.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    if detections:
        return lvis.LVISResults(light, detections, max_dets=max_dets)
    empty = lvis.LVISResults.__new__(lvis.LVISResults)  # LVISResults itself reads results[0]
    empty.logger = logging.getLogger("lvis.results")
    empty.dataset = light.dataset
    empty._create_index()
    return empty


def run_lvis_eval(
    gt: Path | str | LVIS,
    detections: Sequence[dict],
    *,
    max_dets: int = 300,
    image_ids: Sequence[int] | None = None,
    backend: str = BACKENDS[0],
) -> dict[str, float | None]:
    """LVIS mask AP of detections {image_id, category_id, segmentation (compressed RLE), score}.

    `image_ids` restricts the evaluation to those images (default: every image of the ground truth).
    `backend`: "faster_coco_eval" (faster-coco-eval's C++ evaluator, LVIS mode) or "lvis" (LVISEval).
    Returns METRIC_KEYS -> float, or None where LVIS has no ground truth to define it (its -1).
    Without any detection every defined metric is 0.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"unknown evaluation backend {backend!r} (known: {', '.join(BACKENDS)})")
    lvis = _lvis()
    if not isinstance(gt, lvis.LVIS):
        gt = load_lvis(gt)
    known = set(gt.get_img_ids())
    if image_ids is not None:
        image_ids = sorted({int(i) for i in image_ids})
        if not set(image_ids) <= known:
            missing = sorted(set(image_ids) - known)
            raise PipelineError(f"images {missing[:5]} are not in the ground truth")
    dets = []
    for det in detections:
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in det:
                raise PipelineError(f"a detection has no '{key}'")
        if det["image_id"] not in known:
            raise PipelineError(f"detection on image {det['image_id']}, which is not in the ground truth")
        dets.append({key: value for key, value in det.items() if key != "bbox"})  # areas from the mask
    dets = cap_per_image(dets, max_dets)
    if backend == "faster_coco_eval":
        from pipeline.evaluation.faster_eval import faster_lvis_metrics

        results = faster_lvis_metrics(gt, dets, max_dets=max_dets, image_ids=image_ids)
    else:
        _numpy_float_shim()
        with _quiet_lvis():
            evaluator = _lean_lvis_eval()(gt, _results(gt, dets, max_dets), iou_type="segm")
            if image_ids is not None:
                evaluator.params.img_ids = image_ids
            evaluator.params.max_dets = max_dets
            evaluator.run()
            results = evaluator.get_results()
    out: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        value = float(results[key])
        out[key] = None if value == -1 else value
    return out
