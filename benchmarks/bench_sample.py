"""Benchmark of the sample stage's two kernels (a script, not a test).

1. Pair finding for one image: the vectorised rules (one matmul, pipeline.relations.relations) against a
   naive Python double loop over pairs, for 20 random masks at 128x128 and at 640x480, plus the
   `max_side` downscale option.
2. Feature extraction throughput (proposals/s; three crops per proposal, one forward) with resnet18 at
   crop sizes 64 and 224, split into crop time and backbone time.

    python benchmarks/bench_sample.py [--threads 2] [--device cpu] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from pipeline.features import build_backbone, crop_views, pool_features  # noqa: E402
from pipeline.relations import relations  # noqa: E402


def random_masks(n: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n filled ellipses of varied size (so that some overlap and nest), and their boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((n, height, width), dtype=bool)
    boxes = np.zeros((n, 4), dtype=np.float32)
    for k in range(n):
        ry = rng.uniform(0.05, 0.4) * height
        rx = rng.uniform(0.05, 0.4) * width
        cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
        masks[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ys, xs = np.nonzero(masks[k])
        boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return masks, boxes


def naive_pairs(masks: np.ndarray, iou_thresh: float, containment: float) -> tuple[list, list]:
    n = len(masks)
    area = [int(m.sum()) for m in masks]
    obj, hier = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            inter = int(np.logical_and(masks[i], masks[j]).sum())
            union = area[i] + area[j] - inter
            if i < j and area[i] and area[j] and inter / union > iou_thresh:
                obj.append((i, j))
            if area[j] and area[j] < area[i] and inter / area[j] >= containment:
                hier.append((i, j))
    return obj, hier


def best_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_pairs(reps: int) -> None:
    print(f"\n## Pair finding, 20 masks per image (best of {reps}, ms per image)\n")
    print(f"| {'masks':>9} | {'naive loop':>10} | {'vectorised':>10} | {'speed-up':>8} | {'max_side=160':>12} |")
    print(f"|{'-' * 11}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 14}|")
    for height, width in [(128, 128), (480, 640)]:
        masks, _ = random_masks(20, height, width)
        ref_obj, ref_hier = naive_pairs(masks, 0.4, 0.95)
        obj, hier = relations(masks, object_iou=0.4, hier_containment=0.95)
        assert obj.tolist() == [list(p) for p in ref_obj] and hier.tolist() == [list(p) for p in ref_hier]
        t_naive = best_time(lambda m=masks: naive_pairs(m, 0.4, 0.95), reps)
        t_vec = best_time(lambda m=masks: relations(m, object_iou=0.4, hier_containment=0.95), reps)
        t_small = best_time(lambda m=masks: relations(m, object_iou=0.4, hier_containment=0.95, max_side=160), reps)
        print(
            f"| {height:>4}x{width:<4} | {t_naive * 1e3:>10.2f} | {t_vec * 1e3:>10.2f} | "
            f"{t_naive / t_vec:>7.1f}x | {t_small * 1e3:>12.2f} |"
        )
        print(f"|   pairs: object {len(obj)}, hier {len(hier)} |", flush=True)


def bench_features(reps: int, device: str) -> None:
    backbone = build_backbone("resnet18", "random", seed=0).to(device)
    image = np.random.default_rng(1).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    masks, boxes = random_masks(20, 480, 640, seed=2)
    n = len(boxes)
    print(f"\n## Feature extraction, resnet18 on {device}, one 480x640 image with {n} proposals (best of {reps})\n")
    print(f"| {'crop':>4} | {'crops ms':>8} | {'forward ms':>10} | {'proposals/s':>11} | {'views/s':>8} |")
    print(f"|{'-' * 6}|{'-' * 10}|{'-' * 12}|{'-' * 13}|{'-' * 10}|")
    results = {}
    for size in (64, 224):
        views = torch.cat(crop_views(image, boxes, masks, size, device=device))
        t_crop = best_time(lambda s=size: crop_views(image, boxes, masks, s, device=device), reps)
        t_fwd = best_time(lambda v=views: pool_features(backbone, v, len(v), device), reps)
        results[size] = n / (t_crop + t_fwd)
        print(
            f"| {size:>4} | {t_crop * 1e3:>8.1f} | {t_fwd * 1e3:>10.1f} | {results[size]:>11.1f} | "
            f"{3 * results[size]:>8.1f} |",
            flush=True,
        )
    print(f"\nthroughput ratio crop 64 / crop 224: {results[64] / results[224]:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_pairs(args.reps)
    bench_features(args.reps, args.device)


if __name__ == "__main__":
    main()
