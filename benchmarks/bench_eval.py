"""LVIS mask AP at LVIS v1 val size: faster-coco-eval (the default backend) against LVISEval (a script, not a test).

Fabricates an LVIS v1-shaped ground truth and results file, then scores the results once per backend with
`pipeline.evaluation.lvis_eval.run_lvis_eval` (one protocol; the evaluate stage scores three), each in its own
subprocess, and prints a Markdown table: evaluation time (the `run_lvis_eval` call: the JSON and the LVIS index
are loaded before the clock starts), peak RSS of that process (VmHWM from /proc/self/status; not ru_maxrss,
which Linux carries across exec from the forking process, see benchmarks/bench_memory.py) and its increase
over the RSS after loading, the AP it found, and the ratio faster / lvis of time and of peak RSS measured in
the same run. The nine metrics of both backends must be the same doubles; the script says whether they are.

The fabricated data (seeded), at `--scale` 1:
- 19,809 images (LVIS v1 val's count) of 160x120, 120x160 or 200x150 pixels (small images keep the masks'
  RLE short; LVIS's area ranges still all occur: objects are 4 to 110 px a side, log-uniform);
- 1,203 categories with LVIS v1's frequency groups (405 f, 461 c, 337 r), drawn for objects with a long tail
  (probability ~ (rank + 10)^-1.1, frequent first);
- ~12 objects per image (~240 k annotations; LVIS v1 val has 244,707), polygons of 4 to 16 points;
- per image a `neg_category_ids` list (0 to 15 absent categories) and, on a quarter of the images, one or two
  annotated categories in `not_exhaustive_category_ids`;
- 20 detections per image (compressed RLE): shifted copies of the ground truth (80 % of its objects; one in
  five with another category), then boxes of a negative, annotated or random category up to 20 (random ones
  are mostly dropped by LVIS's federated rule), scores uniform.

`--backends stock` adds faster-coco-eval's own `COCOeval_faster.evaluate` over every (image, category) pair,
as it runs without pipeline/evaluation/faster_eval.py's grouping (and without its correction of LVIS's
precision, so its metrics may differ from LVISEval's by ~1e-16); its C++ keeps ~176 bytes per (image,
category, area range), ~1.15 GB per 1,000 images, so it runs on `--stock-fraction` of the images only
(default 0.05); do not raise it towards 1 on a machine with less than ~32 GB.

    python benchmarks/bench_eval.py                          # LVIS v1 val size (faster, lvis; ~4 min on 2 CPUs)
    python benchmarks/bench_eval.py --scale 0.02             # a quick run (400 images)
    python benchmarks/bench_eval.py --lvis-fraction 0.25     # LVISEval on the first quarter of the images only
    python benchmarks/bench_eval.py --backends faster_coco_eval,lvis,stock --keep /tmp/bench_eval
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

LVIS_VAL_IMAGES = 19_809
GROUPS = (("f", 405), ("c", 461), ("r", 337))  # LVIS v1's categories per frequency group
SIZES = ((160, 120), (120, 160), (200, 150))  # (width, height)
METRICS = ("AP", "AP50", "AP75", "APr", "APc", "APf", "APs", "APm", "APl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="images as a fraction of LVIS v1 val's 19,809")
    parser.add_argument("--categories", type=int, default=1203, help="categories (LVIS v1: 1203)")
    parser.add_argument("--objects", type=float, default=12.0, help="mean ground-truth objects per image")
    parser.add_argument("--dets", type=int, default=20, help="detections per image")
    parser.add_argument("--backends", default="faster_coco_eval,lvis", help="faster_coco_eval, lvis, stock")
    parser.add_argument("--lvis-fraction", type=float, default=1.0, help="LVISEval on this fraction of the images")
    parser.add_argument("--stock-fraction", type=float, default=0.05, help="stock faster-coco-eval's fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write the fabricated files here and keep them")
    parser.add_argument("--child", nargs=4, metavar=("BACKEND", "GT", "DETS", "N_IMAGES"), help=argparse.SUPPRESS)
    return parser.parse_args()


# ------------------------------------------------------------------------------------------- fabrication


def _polygon(rng: np.random.Generator, x0: float, y0: float, w: float, h: float) -> list[float]:
    """A rectangle (4 points) or an ellipse of 8 to 16 points inside the box."""
    if rng.random() < 0.4:
        return [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
    n = int(rng.integers(8, 17))
    t = 2 * np.pi * np.arange(n) / n
    xs, ys = x0 + w / 2 * (1 + np.cos(t)), y0 + h / 2 * (1 + np.sin(t))
    return [round(float(v), 2) for pair in zip(xs, ys, strict=True) for v in pair]


def _box(rng: np.random.Generator, width: int, height: int) -> tuple[float, float, float, float]:
    w = min(float(np.exp(rng.uniform(np.log(4), np.log(110)))), width - 2.0)
    h = min(w * float(np.exp(rng.uniform(-0.5, 0.5))), height - 2.0)
    return float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h


def _rle(mask_utils, polygon: list[float], height: int, width: int) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def fabricate(n_images: int, n_categories: int, objects: float, n_dets: int, seed: int) -> tuple[dict, list[dict]]:
    """An LVIS v1-shaped ground truth and a results list (the module doc says what they hold)."""
    import pycocotools.mask as mask_utils

    rng = np.random.default_rng(seed)
    total = sum(n for _, n in GROUPS)
    frequency = [f for f, n in GROUPS for _ in range(round(n * n_categories / total))][:n_categories]
    frequency += ["r"] * (n_categories - len(frequency))
    categories = [{"id": k + 1, "name": f"category_{k + 1}", "frequency": f} for k, f in enumerate(frequency)]
    weights = (np.arange(n_categories) + 10.0) ** -1.1  # ids in frequency order: frequent first
    weights /= weights.sum()
    images, annotations, detections = [], [], []
    for image_id in range(1, n_images + 1):
        width, height = SIZES[image_id % len(SIZES)]
        n_objects = int(rng.poisson(objects - 1)) + 1
        cats = [int(c) + 1 for c in rng.choice(n_categories, n_objects, p=weights)]
        present = sorted(set(cats))
        absent = [int(c) + 1 for c in rng.choice(n_categories, 15, p=weights) if int(c) + 1 not in present]
        negative = sorted(set(absent[: int(rng.integers(0, 16))]))
        not_exhaustive = sorted(rng.choice(present, min(len(present), int(rng.integers(1, 3))), replace=False))
        images.append(
            {
                "id": image_id,
                "width": width,
                "height": height,
                "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                "neg_category_ids": negative,
                "not_exhaustive_category_ids": [int(c) for c in not_exhaustive] if rng.random() < 0.25 else [],
            }
        )
        dets = []
        for cat in cats:
            x0, y0, w, h = _box(rng, width, height)
            polygon = _polygon(rng, x0, y0, w, h)
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))))
            ann_id = len(annotations) + 1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": [polygon],
                    "area": area,
                    "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                }
            )
            if rng.random() < 0.8 and len(dets) < n_dets:
                dx, dy = rng.normal(0, max(1.0, 0.1 * w)), rng.normal(0, max(1.0, 0.1 * h))
                moved = [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(polygon)]
                label = cat if rng.random() < 0.8 else int(rng.choice(present + negative))
                dets.append((label, moved))
        while len(dets) < n_dets:
            pool = [negative, present, list(range(1, n_categories + 1))][int(rng.choice(3, p=[0.3, 0.2, 0.5]))]
            label = int(rng.choice(pool)) if pool else int(rng.integers(1, n_categories + 1))
            dets.append((label, _polygon(rng, *_box(rng, width, height))))
        for label, polygon in dets:
            segmentation = _rle(mask_utils, polygon, height, width)
            detections.append({"image_id": image_id, "category_id": label, "segmentation": segmentation})
    scores = rng.uniform(size=len(detections))
    for det, score in zip(detections, scores, strict=True):
        det["score"] = round(float(score), 6)
    gt = {"info": {"description": "fabricated LVIS v1 val"}, "images": images, "annotations": annotations}
    gt["categories"] = categories
    return gt, detections


# ------------------------------------------------------------------------------------------------ child


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _stock(gt, detections: list[dict], image_ids: list[int]) -> dict:
    """faster-coco-eval's own COCOeval_faster (LVIS mode) over every (image, category) pair, as shipped.

    Detections its federated rule drops are left out first (its _prepare fails on some: faster_eval.py).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    from pipeline.evaluation.faster_eval import AREA_RANGES, _ground_truth, _kept_detections

    images = set(image_ids)
    gts = _ground_truth(gt, image_ids)
    present: dict[int, set[int]] = {i: set() for i in image_ids}
    for ann in gts:
        present[ann["image_id"]].add(ann["category_id"])
    data = {"images": [gt.imgs[i] for i in image_ids], "categories": gt.dataset["categories"]}
    coco_gt = COCO({**data, "annotations": gts})
    coco_dt = COCO({**data, "annotations": _kept_detections(detections, gt, present, images)})
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="segm", ranges=AREA_RANGES, lvis_style=True)
    evaluator.print_function = lambda *args, **kwargs: None
    evaluator.params.imgIds = image_ids
    evaluator.params.maxDets = [300]
    evaluator.run()
    stats = evaluator.stats_as_dict
    names = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium"}
    names |= {"APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf"}
    return {key: (None if stats[name] == -1 else stats[name]) for key, name in names.items()}


def child(backend: str, gt_json: str, dets_json: str, n_images: int) -> None:
    """Score the results with one backend; print one JSON line: seconds, RSS after loading, peak RSS, metrics."""
    from pipeline.evaluation.lvis_eval import load_lvis, run_lvis_eval

    gt = load_lvis(gt_json)
    image_ids = sorted(gt.get_img_ids())[:n_images]
    keep = set(image_ids)
    detections = [d for d in json.loads(Path(dets_json).read_text()) if d["image_id"] in keep]
    loaded_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    if backend == "stock":
        metrics = _stock(gt, detections, image_ids)
    else:
        metrics = run_lvis_eval(gt, detections, max_dets=300, image_ids=image_ids, backend=backend)
    seconds = time.perf_counter() - start
    report = {"seconds": seconds, "loaded_kb": loaded_kb, "peak_kb": _status_kb("VmHWM"), "metrics": metrics}
    print(json.dumps(report))


# ----------------------------------------------------------------------------------------------- parent


def run_child(backend: str, gt_json: Path, dets_json: Path, n_images: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backend, str(gt_json), str(dets_json)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([*cmd, str(n_images)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {**report, "wall": time.perf_counter() - start, "backend": backend, "images": n_images}


def table(rows: list[dict]) -> str:
    head = ["backend", "images", "eval time (s)", "process (s)", "peak RSS (GB)", "over loaded (GB)", "AP", "APr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        cells = [
            r["backend"],
            f"{r['images']:,}",
            f"{r['seconds']:.1f}",
            f"{r['wall']:.1f}",
            f"{r['peak_kb'] / 2**20:.2f}",
            f"{(r['peak_kb'] - r['loaded_kb']) / 2**20:.2f}",
            "n/a" if m["AP"] is None else f"{m['AP']:.4f}",
            "n/a" if m["APr"] is None else f"{m['APr']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.child:
        backend, gt_json, dets_json, n_images = args.child
        child(backend, gt_json, dets_json, int(n_images))
        return
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"faster_coco_eval", "lvis", "stock"}
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}")
    n_images = max(1, round(LVIS_VAL_IMAGES * args.scale))
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_eval_"))
    folder.mkdir(parents=True, exist_ok=True)
    gt_json, dets_json = folder / "lvis_v1_val_fabricated.json", folder / "results_fabricated.json"
    start = time.perf_counter()
    gt, detections = fabricate(n_images, args.categories, args.objects, args.dets, args.seed)
    gt_json.write_text(json.dumps(gt))
    dets_json.write_text(json.dumps(detections))
    groups = {f: sum(c["frequency"] == f for c in gt["categories"]) for f in "rcf"}
    print(
        f"fabricated in {time.perf_counter() - start:.0f} s: {n_images:,} images, {len(gt['categories'])} categories "
        f"(r {groups['r']}, c {groups['c']}, f {groups['f']}), {len(gt['annotations']):,} annotations, "
        f"{len(detections):,} detections ({gt_json.stat().st_size / 2**20:.0f} + {dets_json.stat().st_size / 2**20:.0f}"
        f" MB of JSON); {os.cpu_count()} CPUs\n"
    )
    runs = []
    lvis_images = max(1, math.floor(n_images * args.lvis_fraction))
    if "faster_coco_eval" in backends:
        runs.append(("faster_coco_eval", n_images))
        if "lvis" in backends and lvis_images < n_images:  # the ratio compares the same images
            runs.append(("faster_coco_eval", lvis_images))
    if "lvis" in backends:
        runs.append(("lvis", lvis_images))
    if "stock" in backends:
        stock_images = max(1, math.floor(n_images * args.stock_fraction))
        runs.append(("stock", stock_images))
        if "faster_coco_eval" in backends:
            runs.append(("faster_coco_eval", stock_images))
    rows = []
    for backend, images in runs:
        print(f"running {backend} on {images:,} images ...", flush=True)
        rows.append(run_child(backend, gt_json, dets_json, images))
    print()
    print(table(rows))
    print()
    for row in rows:
        if row["backend"] == "faster_coco_eval":
            continue
        same = [r for r in rows if r["backend"] == "faster_coco_eval" and r["images"] == row["images"]]
        if not same:
            continue
        fast = same[0]
        equal = all(fast["metrics"][k] == row["metrics"][k] for k in METRICS)
        worst = max(abs((fast["metrics"][k] or 0.0) - (row["metrics"][k] or 0.0)) for k in METRICS)
        print(
            f"faster_coco_eval / {row['backend']} on the same {row['images']:,} images: time "
            f"{fast['seconds'] / row['seconds']:.4f} ({row['seconds'] / fast['seconds']:.1f}x faster), peak RSS "
            f"{fast['peak_kb'] / row['peak_kb']:.3f}; the nine metrics "
            + ("are the same doubles" if equal else f"differ (largest difference {worst:.3g})")
        )
    if args.keep is None:
        for path in (gt_json, dets_json):
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
