"""Peak resident memory of every stage at two dataset sizes, one 4x the other (a script, not a test).

Every stage streams its stores by chunks of images (DESIGN.md, "Scale"), so its peak memory should not
grow with the dataset. This runs each stage's real CLI (`python -m stages.X`) in its own subprocess, in a
temporary workspace, once on an input of size 1x and once on 4x, and reports the peak RSS of that process
(VmHWM of the stage process itself, read from /proc/self/status by a tiny runpy wrapper when the stage
exits; child processes, e.g. DataLoader workers, are polled and their largest VmHWM reported separately
when there are any), the ratio 4x / 1x, and a projection to LVIS v1 (a + b * size through the two points).

Not ru_maxrss: Linux carries it across exec from the forking process (subprocess uses vfork, so a stage
started by a benchmark holding 2 GB would report at least 2 GB), and torch's import runs `ldconfig -p`
that way too, so RUSAGE_CHILDREN reports the stage's own size for that short-lived child.

Inputs are fabricated so that two cores can run them in minutes while the data stay large:
- an LVIS v1-shaped dataset (real LVIS layout: coco_url into train2017/ and val2017/, COCO file_names),
  written as JSON text with LVIS v1's object count per image (12.7 polygon annotations of 50 points per
  train image, ~9 KB of JSON; COCO: 7.3 annotations of 25 points, ~3.3 KB), 1203 categories, and tiny
  images (hard links to a few files); `prepare` runs on it (source lvis), the other stages get a manifest
  (data/prepared/dataset.json) written here;
- an untrained proposer checkpoint (`propose.score_thresh` 0, so every image yields `max_proposals`);
  `train_proposer` trains 2 steps on 8 images, the rest of its COCO file excluded through the manifest;
- `propose` and `sample` run a network on every proposal, so only some images have files (propose skips
  the others, `on_missing_image: skip`) or proposals (sample): the annotation file keeps its full size;
- the stores downstream of `propose` written directly (pipeline.stores.store.StoreWriter, the attrs and
  fingerprint chain the stages check): random features of resnet50's width (D = 2048, float16) for embed,
  embeddings inside the unit ball for cluster, masks of a larger side than the mask head's 28 where a
  stage reads masks (more bytes per proposal: a stage that held them whole would show it).

The projection extrapolates the per-image slope, so it holds as far as the fabricated files have LVIS's
per-image volume (object count and polygon points; the real files' exact sizes were not available here).

    python benchmarks/bench_memory.py            # the full run (about 6 min on 2 idle CPU cores)
    python benchmarks/bench_memory.py --quick    # a smoke run on small sizes (ratios not meaningful)
    python benchmarks/bench_memory.py --stages embed,cluster --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from pipeline.config import as_dict, load_params, parse_params  # noqa: E402
from pipeline.data.dataset import Manifest, write_manifest  # noqa: E402
from pipeline.stores.store import StoreWriter, atomic_path, offsets_from_counts  # noqa: E402

GB = 1 << 30
MB = 1 << 20

# LVIS v1 / COCO 2017 at full size: what the projection extrapolates to
LVIS_TRAIN_IMAGES = 100_170
LVIS_VAL_IMAGES = 19_809
COCO_TRAIN_IMAGES = 118_287
LVIS_CATEGORIES = 1203
PROPOSALS_PER_IMAGE = 20
LVIS_ANNS_PER_IMAGE = 1_270_141 / LVIS_TRAIN_IMAGES  # 12.7 polygon annotations per LVIS v1 train image
COCO_ANNS_PER_IMAGE = 860_001 / COCO_TRAIN_IMAGES  # 7.3 per COCO train2017 image
RESNET50_DIM = 2048
REAL_MASK_SIDE = 28  # the mask head's native resolution (what `propose` writes)
POLYGON_POINTS = 50  # LVIS polygons: ~50 (x, y) points, ~11 KB of JSON per train image in all
TARGET_RATIO = 1.3
TARGET_PEAK_GB = 16.0

# The wrapper every stage runs under: the stage module as __main__ (runpy), then its own peak RSS.
WRAPPER = """
import json, runpy, sys


def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


module, report = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
finally:
    with open(report, "w") as f:
        json.dump({"self_kb": peak_kb()}, f)
sys.exit(code)
"""


# ------------------------------------------------------------------------------------------ fabricated dataset


@dataclass
class Dataset:
    """An LVIS v1-shaped dataset in a workspace: the three annotation files and their (hard-linked) images."""

    train_json: Path
    val_json: Path
    coco_json: Path
    image_root: Path  # holds train2017/ and val2017/, as COCO does
    train_ids: np.ndarray
    val_ids: np.ndarray
    coco_ids: np.ndarray
    size: int  # every image is size x size pixels

    def nbytes(self, *names: str) -> int:
        return sum(getattr(self, f"{name}_json").stat().st_size for name in names)


def _frequencies() -> list[str]:
    """LVIS v1's 405 frequent, 461 common and 337 rare categories (ids 1..1203, frequent first)."""
    return ["f"] * 405 + ["c"] * 461 + ["r"] * 337


def _polygon_pool(size: int, points: int, rng: np.random.Generator, n: int = 256) -> list[tuple[str, float, str]]:
    """`n` star-shaped polygons inside a size x size image: (flat coordinates text, area, bbox text)."""
    pool = []
    for _ in range(n):
        radius = rng.uniform(0.06, 0.3) * size
        cy, cx = rng.uniform(radius, size - radius, 2)
        angle = np.sort(rng.uniform(0, 2 * np.pi, points))
        r = radius * rng.uniform(0.6, 1.0, points)
        x = np.clip(cx + r * np.cos(angle), 0, size - 1)
        y = np.clip(cy + r * np.sin(angle), 0, size - 1)
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        coords = ",".join(f"{v:.2f}" for v in np.stack([x, y], 1).reshape(-1))
        bbox = f"[{x.min():.2f},{y.min():.2f},{x.max() - x.min():.2f},{y.max() - y.min():.2f}]"
        pool.append((coords, float(area), bbox))
    return pool


def _write_instances(
    path: Path,
    ids: np.ndarray,
    folder: str,
    size: int,
    *,
    lvis: bool,
    anns_per_image: float,
    points: int,
    rng: np.random.Generator,
) -> None:
    """An LVIS v1 (lvis=True: coco_url, neg/not-exhaustive lists, 1203 categories with frequencies) or COCO
    instances file (file_name, iscrowd, 80 categories), written as text image by image (any size, fast)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = _polygon_pool(size, points, rng)
    n_cats = LVIS_CATEGORIES if lvis else 80
    weights = 1.0 / np.arange(1, n_cats + 1) ** 0.8  # a long tail: low ids frequent
    weights /= weights.sum()
    counts = np.maximum(1, rng.poisson(anns_per_image, len(ids)))
    cats = rng.choice(n_cats, size=int(counts.sum()), p=weights) + 1
    shapes = rng.integers(0, len(pool), size=int(counts.sum()))
    with path.open("w") as f:
        f.write('{"info":{"description":"bench_memory fabricated","version":"1.0","year":2026},')
        f.write('"licenses":[{"id":1,"name":"none","url":""}],"images":[')
        for start in range(0, len(ids), 2000):
            rows = []
            for image_id in ids[start : start + 2000]:
                name = f"{int(image_id):012d}.jpg"
                url = f"http://images.cocodataset.org/{folder}/{name}"
                head = f'{{"id":{int(image_id)},"width":{size},"height":{size},"coco_url":"{url}","license":1,'
                head += '"date_captured":"2013-11-14 16:28:13","flickr_url":"http://farm4.staticflickr.com/x.jpg",'
                if lvis:
                    neg = ",".join(str(c) for c in rng.choice(n_cats, 8, replace=False) + 1)
                    rows.append(head + f'"neg_category_ids":[{neg}],"not_exhaustive_category_ids":[]}}')
                else:
                    rows.append(head + f'"file_name":"{name}"}}')
            f.write(("," if start else "") + ",".join(rows))
        f.write('],"annotations":[')
        ann = 0
        image_of = np.repeat(ids, counts)
        for start in range(0, len(image_of), 20000):
            rows = []
            for image_id in image_of[start : start + 20000]:
                coords, area, bbox = pool[shapes[ann]]
                crowd = "" if lvis else ',"iscrowd":0'
                rows.append(
                    f'{{"id":{ann + 1},"image_id":{int(image_id)},"category_id":{int(cats[ann])},'
                    f'"segmentation":[[{coords}]],"area":{area:.2f},"bbox":{bbox}{crowd}}}'
                )
                ann += 1
            f.write(("," if start else "") + ",".join(rows))
        f.write('],"categories":[')
        if lvis:
            freq = _frequencies()
            seen = np.bincount(cats, minlength=n_cats + 1)
            rows = [
                f'{{"id":{c},"name":"cat_{c:04d}","synonyms":["cat_{c:04d}"],"def":"a fabricated category",'
                f'"synset":"cat_{c:04d}.n.01","frequency":"{freq[c - 1]}","image_count":{int(seen[c])},'
                f'"instance_count":{int(seen[c])}}}'
                for c in range(1, n_cats + 1)
            ]
        else:
            rows = [f'{{"id":{c},"name":"cat_{c:04d}","supercategory":"thing"}}' for c in range(1, n_cats + 1)]
        f.write(",".join(rows) + "]}\n")


def _link_images(folder: Path, ids: np.ndarray, size: int, rng: np.random.Generator) -> None:
    """One file per image id (`<id:012d>.jpg`), hard links to 16 random-texture JPEGs of size x size."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for k in range(16):
        base = folder.parent / f".base-{folder.name}-{k}.jpg"
        if not base.exists():
            pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(base, quality=90)
        bases.append(base)
    for image_id in ids:
        os.link(bases[int(image_id) % len(bases)], folder / f"{int(image_id):012d}.jpg")


def make_dataset(
    ws: Path, n_train: int, n_val: int, n_coco: int, size: int, *, link_step: int = 1, link_limit: int | None = None
) -> Dataset:
    """LVIS v1 train/val and COCO train2017-shaped files under ws/datasets: LVIS train ids 1..n_train and
    COCO ids 1..n_coco live in train2017/, LVIS val ids after them in val2017/ (reached through coco_url).
    Image files exist for every `link_step`-th id of each folder (at most `link_limit`), the first included."""
    rng = np.random.default_rng(0)
    base = ws / "datasets"
    train_ids = np.arange(1, n_train + 1, dtype=np.int64)
    val_ids = np.arange(n_train + 1, n_train + n_val + 1, dtype=np.int64)
    coco_ids = np.arange(1, n_coco + 1, dtype=np.int64)
    data = Dataset(
        train_json=base / "lvis/lvis_v1_train.json",
        val_json=base / "lvis/lvis_v1_val.json",
        coco_json=base / "coco/annotations/instances_train2017.json",
        image_root=base / "coco",
        train_ids=train_ids,
        val_ids=val_ids,
        coco_ids=coco_ids,
        size=size,
    )
    lvis = {"lvis": True, "anns_per_image": LVIS_ANNS_PER_IMAGE, "points": POLYGON_POINTS, "rng": rng}
    if n_train:
        _write_instances(data.train_json, train_ids, "train2017", size, **lvis)
    if n_val:
        _write_instances(data.val_json, val_ids, "val2017", size, **lvis)
    if n_coco:
        coco = {"lvis": False, "anns_per_image": COCO_ANNS_PER_IMAGE, "points": POLYGON_POINTS // 2, "rng": rng}
        _write_instances(data.coco_json, coco_ids, "train2017", size, **coco)
    for folder, ids in (("train2017", np.arange(1, max(n_train, n_coco) + 1)), ("val2017", val_ids)):
        _link_images(data.image_root / folder, ids[::link_step][:link_limit], size, rng)
    return data


def write_dataset_manifest(ws: Path, data: Dataset, excluded: list[int] | None = None) -> None:
    """data/prepared/dataset.json for `data` (what `prepare` writes for real LVIS, without its checks)."""
    files = {}
    for path in (data.train_json, data.val_json, data.coco_json):
        if path.exists():
            stat = path.stat()
            files[str(path)] = f"{stat.st_size}-{int(stat.st_mtime)}"
    manifest = Manifest(
        source="lvis",
        train_json=str(data.train_json),
        val_json=str(data.val_json),
        image_root=str(data.image_root),
        proposer_json=str(data.coco_json),
        base_category_ids=list(range(1, 81)),
        files=files,
        proposer_image_root=str(data.image_root / "train2017"),
        proposer_excluded_image_ids=sorted(excluded or []),
    )
    folder = ws / "data/prepared"
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder / "dataset.json", manifest)


# ------------------------------------------------------------------------------------------- fabricated stores

BLOCK_IMAGES = 1024  # images fabricated (and written) at a time


def _mask_templates(side: int, rng: np.random.Generator, n: int = 32) -> np.ndarray:
    """(n, side, side) uint8 probability maps (x255) of ellipses of varied shape, like a mask head's output."""
    yy, xx = (np.mgrid[:side, :side] + 0.5) / side - 0.5
    out = np.zeros((n, side, side), np.uint8)
    for k in range(n):
        ry, rx = rng.uniform(0.25, 0.5, 2)
        r2 = (yy / ry) ** 2 + (xx / rx) ** 2
        out[k] = np.clip(255 * (1.3 - r2), 0, 255).astype(np.uint8)
    return out


def write_proposals(
    path: Path, image_ids: np.ndarray, size: int, counts: np.ndarray, mask_side: int, split: str, seed: int = 0
) -> tuple[str, dict]:
    """A proposals store (DESIGN.md's contract): counts[i] random proposals on size x size image i, masks of
    `mask_side` x `mask_side`, streamed 20k proposals at a time. Returns (fingerprint, nbytes)."""
    rng = np.random.default_rng(seed)
    n_images, n = len(image_ids), int(np.sum(counts))
    templates = _mask_templates(mask_side, rng)
    with atomic_path(path) as tmp:
        writer = StoreWriter(tmp)
        writer.write_array("image_ids", np.asarray(image_ids, np.int64))
        writer.write_array("image_hw", np.full((n_images, 2), size, np.int64))
        writer.write_array("image_offsets", offsets_from_counts(counts))
        arrays = {
            "boxes": writer.array("boxes", (n, 4), np.float32),
            "scores": writer.array("scores", (n,), np.float32),
            "masks": writer.array("masks", (n, mask_side, mask_side), np.uint8),
        }
        step = max(1, (32 << 20) // (mask_side * mask_side))  # 32 MB of masks at a time
        for start in range(0, n, step):
            rows = min(step, n - start)
            wh = rng.uniform(0.1, 0.6, (rows, 2)) * size
            xy = rng.uniform(0, 1, (rows, 2)) * (size - wh)
            arrays["boxes"].write(np.concatenate([xy, xy + wh], 1).astype(np.float32))
            arrays["scores"].write(rng.uniform(0.05, 1, rows).astype(np.float32))
            arrays["masks"].write(templates[rng.integers(0, len(templates), rows)])
        for array in arrays.values():
            writer.close(array)
        attrs = {
            "split": split,
            "params": {"fabricated_by": "benchmarks/bench_memory.py"},
            "proposer_digest": "fabricated",
            "mask_format": "uint8 probability x255, box-relative, paste into the box and threshold at 0.5",
            "counts": {"images": n_images, "proposals": n, "empty_images": int(np.sum(np.asarray(counts) == 0))},
            "skipped_image_ids": [],
        }
        fingerprint = writer.finish(attrs, "proposals")
    return fingerprint, {"masks": n * mask_side * mask_side, "boxes+scores": n * 20}


def _pairs(n_images: int, per_image: int, per_proposal: float, rng: np.random.Generator) -> np.ndarray:
    """About `per_proposal` pairs per proposal, both rows in the same image, first != second (global rows)."""
    n = n_images * per_image
    first = rng.integers(0, n, int(n * per_proposal))
    image = first // per_image
    second = image * per_image + (first % per_image + rng.integers(1, per_image, len(first))) % per_image
    order = np.argsort(first, kind="stable")  # image order, as `sample` writes them
    return np.stack([first[order], second[order]], 1).astype(np.int64)


def write_samples(
    path: Path,
    n_images: int,
    per_image: int,
    dim: int,
    split: str,
    source_fingerprint: str,
    dtype: str = "float16",
    seed: int = 0,
) -> tuple[str, dict]:
    """A samples store: random (N, dim) features of the three views in `dtype`, ~1 object and ~0.5 hier pair per
    proposal within images, stamped with its proposals store's fingerprint. Returns (fingerprint, nbytes)."""
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    pool = rng.standard_normal((6, 2048, dim), dtype=np.float32).astype(dtype)  # rows reused, rotated
    object_pairs = _pairs(n_images, per_image, 1.0, rng)
    hier_pairs = _pairs(n_images, per_image, 0.5, rng)
    with atomic_path(path) as tmp:
        writer = StoreWriter(tmp)
        writer.write_array("image_offsets", offsets_from_counts(np.full(n_images, per_image)))
        step = pool.shape[1]
        for v, view in enumerate(("box", "fg", "bg")):
            array = writer.array(f"features/{view}", (n, dim), dtype)
            for k, start in enumerate(range(0, n, step)):
                array.write(pool[(k + 3 * v) % len(pool), : min(step, n - start)])
            writer.close(array)
        writer.write_array("pairs/object", object_pairs)
        writer.write_array("pairs/hier", hier_pairs)
        attrs = {
            "split": split,
            "params": {"fabricated_by": "benchmarks/bench_memory.py"},
            "backbone": "fabricated",
            "feature_dim": dim,
            "feature_dtype": dtype,
            "source": f"data/{split}/proposals.zarr",
            "source_fingerprint": source_fingerprint,
            "counts": {
                "images": n_images,
                "proposals": n,
                "object_pairs": len(object_pairs),
                "hier_pairs": len(hier_pairs),
            },
        }
        fingerprint = writer.finish(attrs, "samples")
    nbytes = {"features": 3 * n * dim * np.dtype(dtype).itemsize, "pairs": (len(object_pairs) + len(hier_pairs)) * 16}
    return fingerprint, nbytes


def write_embeddings(path: Path, n_images: int, per_image: int, dim: int, source_fingerprint: str, seed: int = 0):
    """An embeddings store of the val split: points of the Poincaré ball (c = 1) at radius < 0.95 around 50
    random directions (so k-means has something to find). Returns (fingerprint, nbytes)."""
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    centres = rng.standard_normal((50, dim))
    with atomic_path(path) as tmp:
        writer = StoreWriter(tmp)
        array = writer.array("embeddings", (n, dim), np.float32)
        step = 1 << 18
        for start in range(0, n, step):
            rows = min(step, n - start)
            v = centres[rng.integers(0, len(centres), rows)] + 0.5 * rng.standard_normal((rows, dim))
            v *= (rng.uniform(0.1, 0.95, rows) / np.linalg.norm(v, axis=1))[:, None]
            array.write(v.astype(np.float32))
        writer.close(array)
        writer.write_array("image_offsets", offsets_from_counts(np.full(n_images, per_image)))
        attrs = {
            "split": "val",
            "geometry": "poincare",
            "curvature": 1.0,
            "dim": dim,
            "params": {"fabricated_by": "benchmarks/bench_memory.py"},
            "source": "data/val/samples.zarr",
            "source_fingerprint": source_fingerprint,
            "counts": {"proposals": n, "train_proposals": 0},
        }
        fingerprint = writer.finish(attrs, "embeddings")
    return fingerprint, {"embeddings": n * dim * 4}


def write_clusters(path: Path, n: int, k: int, dim: int, source_fingerprint: str, seed: int = 0) -> str:
    """A clusters store: a random assignment of `n` proposals to `k` clusters."""
    rng = np.random.default_rng(seed)
    arrays = {
        "assignment": rng.integers(0, k, n).astype(np.int32),
        "distance": rng.uniform(0, 3, n),
        "centroids": rng.uniform(-0.05, 0.05, (k, dim)),
    }
    attrs = {
        "split": "val",
        "K": k,
        "k_choice": "fixed",
        "elbow_k": k,
        "inertia": 0.0,
        "iterations": 0,
        "converged": True,
        "centroid_rule": "einstein",
        "geometry": "poincare",
        "curvature": 1.0,
        "faiss": "fabricated",
        "params": {"fabricated_by": "benchmarks/bench_memory.py"},
        "source": "data/val/embeddings.zarr",
        "source_fingerprint": source_fingerprint,
        "counts": {"points": n, "clusters": k, "nonempty": k},
    }
    with atomic_path(path) as tmp:
        writer = StoreWriter(tmp)
        for name, value in arrays.items():
            writer.write_array(name, value)
        return writer.finish(attrs, "clusters")


def write_proposer(path: Path, image_size: int) -> None:
    """An untrained proposer checkpoint (what `train_proposer` writes), resnet18 FPN for image_size images."""
    import torch

    from pipeline.models.proposer import build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(build_model("resnet18", image_size), path, "resnet18", image_size)


# ------------------------------------------------------------------------------------------ params and runs


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_params(ws: Path, overrides: dict) -> None:
    """ws/params.yaml: the repository's params.yaml (its defaults if it does not load) with `overrides`, checked."""
    from pipeline.config import Params
    from pipeline.errors import PipelineError

    try:
        base = as_dict(load_params(ROOT / "params.yaml"))
    except PipelineError:
        base = as_dict(Params())
    params = _merge(base, {"device": "cpu", **overrides})
    parse_params(params, "bench params")  # a one-line error here rather than in the stage
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (through /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                out.append(child)
                todo.append(child)
    return out


def _hwm_kb(pid: int) -> int:
    """VmHWM (peak RSS) of a live process in KB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_stage(ws: Path, module: str, args: list[str], log: Path, timeout: float) -> dict:
    """`python -m <module> <args>` with cwd=ws under the peak-RSS wrapper.

    Returns {seconds, self_kb (VmHWM of the stage process at exit), children_kb (the largest VmHWM of its
    child processes, polled every 0.2 s: DataLoader workers and the like; a forked child's figure counts the
    pages it shares with the stage)}.
    """
    report = ws / ".peak_rss.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    children: dict[int, int] = {}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, module, str(report), *args],
            cwd=ws,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        while proc.poll() is None:
            for child in _descendants(proc.pid):
                children[child] = max(children.get(child, 0), _hwm_kb(child))
            if time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{module} {' '.join(args)}: no result after {timeout:.0f}s (see {log})")
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}) in {ws}:\n" + "\n".join(tail))
    usage = json.loads(report.read_text())
    return {"seconds": seconds, "self_kb": usage["self_kb"], "children_kb": max(children.values(), default=0)}


def import_peak_kb(module: str) -> int:
    """Peak RSS of a process that only imports `module` (the interpreter, torch and the stage's libraries)."""
    code = f"import importlib; importlib.import_module({module!r}); "
    code += "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


# -------------------------------------------------------------------------------------------------- the stages

VAL_PER_TRAIN = LVIS_VAL_IMAGES / LVIS_TRAIN_IMAGES  # 0.198
COCO_PER_TRAIN = COCO_TRAIN_IMAGES / LVIS_TRAIN_IMAGES  # 1.18
PROPOSE_PRESENT_EVERY = 100  # propose: one listed image in 100 has a file (the rest are skipped, no inference)
SAMPLE_PROPOSALS_EVERY = 50  # sample: one image in 50 has proposals (the backbone runs on those only)
SAMPLE_MASK_SIDE = 384  # sample's input masks: 147 KB per proposal (the mask head's 28 x 28: 784 B)
EVALUATE_MASK_SIDE = 160  # evaluate's input masks: 25 KB per proposal (a block of 4096: 100 MB)
EVALUATE_IMAGE_SIZE = 128
EMBED_DIM = 256  # embed.dim (params.yaml)


@dataclass
class Case:
    """One stage measured at two sizes: `setup(ws, size)` fabricates its inputs and params in `ws` and returns
    {"proposals": int, "bytes": int} (the stage's main data at that size, uncompressed)."""

    name: str
    module: str
    args: list[str]
    unit: str  # what `size` counts
    size: int  # the 1x size (4x is 4 * size)
    quick: int  # the 1x size of --quick
    lvis: int  # the LVIS v1 value of `unit`, for the projection
    setup: Callable[[Path, int], dict]
    data: str  # what "bytes" counts
    note: str = ""
    results: dict = field(default_factory=dict)


def setup_prepare(ws: Path, n: int) -> dict:
    data = make_dataset(ws, n, round(n * VAL_PER_TRAIN), round(n * COCO_PER_TRAIN), 32)
    lvis = {"train_json": str(data.train_json), "val_json": str(data.val_json), "image_root": str(data.image_root)}
    lvis |= {"coco_json": str(data.coco_json), "coco_image_root": None}
    write_params(ws, {"data": {"source": "lvis", "lvis": lvis}})
    return {"proposals": 0, "bytes": data.nbytes("train", "val", "coco")}


def setup_train_proposer(ws: Path, n: int) -> dict:
    data = make_dataset(ws, 0, 0, n, 64, link_limit=8)
    write_dataset_manifest(ws, data, excluded=[int(i) for i in data.coco_ids[8:]])  # 8 images: 2 steps
    write_params(ws, {"proposer": {"backbone": "resnet18", "image_size": 64, "epochs": 1, "batch_size": 4}})
    return {"proposals": 0, "bytes": data.nbytes("coco")}


def setup_propose(ws: Path, n: int) -> dict:
    data = make_dataset(ws, n, 0, 0, 64, link_step=PROPOSE_PRESENT_EVERY)
    write_dataset_manifest(ws, data)
    write_proposer(ws / "models/proposer.pt", 64)
    propose = {"score_thresh": 0.0, "max_proposals": PROPOSALS_PER_IMAGE, "on_missing_image": "skip"}
    write_params(ws, {"propose": propose})
    n_present = len(range(0, n, PROPOSE_PRESENT_EVERY))
    masks = n_present * PROPOSALS_PER_IMAGE * (REAL_MASK_SIDE**2 + 20)
    return {"proposals": n_present * PROPOSALS_PER_IMAGE, "bytes": data.nbytes("train") + masks}


def setup_sample(ws: Path, n: int) -> dict:
    data = make_dataset(ws, n, 0, 0, 64, link_step=SAMPLE_PROPOSALS_EVERY)
    write_dataset_manifest(ws, data)
    counts = np.where(np.arange(n) % SAMPLE_PROPOSALS_EVERY == 0, PROPOSALS_PER_IMAGE, 0)
    _, nbytes = write_proposals(ws / "data/train/proposals.zarr", data.train_ids, 64, counts, SAMPLE_MASK_SIDE, "train")
    sample = {"crop_size": 32, "backbone": "resnet18", "backbone_init": "random", "dtype": "float16"}
    write_params(ws, {"sample": sample})
    features = int(counts.sum()) * 3 * 512 * 2
    return {"proposals": int(counts.sum()), "bytes": data.nbytes("train") + sum(nbytes.values()) + features}


def setup_embed(ws: Path, n: int) -> dict:
    total = 0
    for split, images in (("train", n), ("val", max(1, round(n * VAL_PER_TRAIN)))):
        ids = np.arange(1, images + 1)
        counts = np.full(images, PROPOSALS_PER_IMAGE)
        source, _ = write_proposals(ws / f"data/{split}/proposals.zarr", ids, 64, counts, REAL_MASK_SIDE, split)
        path = ws / f"data/{split}/samples.zarr"
        _, nbytes = write_samples(path, images, PROPOSALS_PER_IMAGE, RESNET50_DIM, split, source)
        total += sum(nbytes.values())
    embed = {"epochs": 1, "batch_size": 256, "dim": EMBED_DIM, "num_workers": 0}
    write_params(ws, {"embed": embed})
    return {"proposals": n * PROPOSALS_PER_IMAGE, "bytes": total}


def setup_cluster(ws: Path, n: int) -> dict:
    _, nbytes = write_embeddings(ws / "data/val/embeddings.zarr", n, PROPOSALS_PER_IMAGE, EMBED_DIM, "fabricated")
    write_params(ws, {"cluster": {"k": "auto", "k_range": [4, 12, 4], "max_iter": 3}})
    return {"proposals": n * PROPOSALS_PER_IMAGE, "bytes": nbytes["embeddings"]}


def setup_evaluate(ws: Path, n: int) -> dict:
    data = make_dataset(ws, 0, n, 0, EVALUATE_IMAGE_SIZE)
    write_dataset_manifest(ws, data)
    counts = np.full(n, PROPOSALS_PER_IMAGE)
    folder = ws / "data/val"
    proposals, nbytes = write_proposals(
        folder / "proposals.zarr", data.val_ids, EVALUATE_IMAGE_SIZE, counts, EVALUATE_MASK_SIDE, "val"
    )
    samples, _ = write_samples(folder / "samples.zarr", n, PROPOSALS_PER_IMAGE, 8, "val", proposals)
    embeddings, more = write_embeddings(folder / "embeddings.zarr", n, PROPOSALS_PER_IMAGE, EMBED_DIM, samples)
    write_clusters(folder / "clusters.zarr", n * PROPOSALS_PER_IMAGE, 100, EMBED_DIM, embeddings)
    write_params(ws, {})
    return {
        "proposals": n * PROPOSALS_PER_IMAGE,
        "bytes": data.nbytes("val") + sum(nbytes.values()) + more["embeddings"],
    }


CASES = [
    Case(
        "prepare",
        "stages.prepare",
        [],
        "train images",
        10_000,
        1000,
        LVIS_TRAIN_IMAGES,
        setup_prepare,
        "LVIS train + val + COCO JSON (val 0.198x, COCO 1.18x the train images)",
        "source lvis: checks the three files in place",
    ),
    Case(
        "train_proposer",
        "stages.train_proposer",
        [],
        "COCO images",
        30_000,
        3000,
        COCO_TRAIN_IMAGES,
        setup_train_proposer,
        "COCO JSON",
        "all but 8 images excluded through the manifest: 2 steps of 4 images at 64 px; "
        "the file is streamed into an on-disk index",
    ),
    Case(
        "propose@train",
        "stages.propose",
        ["--split", "train"],
        "train images",
        5000,
        500,
        LVIS_TRAIN_IMAGES,
        setup_propose,
        "train JSON + masks written",
        f"untrained proposer at 64 px, score_thresh 0; 1 listed image in {PROPOSE_PRESENT_EVERY} has a file, "
        "the rest are skipped (on_missing_image: skip) so that inference stays cheap",
    ),
    Case(
        "sample@train",
        "stages.sample",
        ["--split", "train"],
        "train images",
        5000,
        500,
        LVIS_TRAIN_IMAGES,
        setup_sample,
        f"train JSON + masks read ({SAMPLE_MASK_SIDE}²) + features written",
        f"resnet18 (random init) on 32 px crops; 1 image in {SAMPLE_PROPOSALS_EVERY} has 20 proposals "
        "(features are written part by part: the feature width does not enter the slope)",
    ),
    Case(
        "embed",
        "stages.embed",
        [],
        "train images",
        1250,
        150,
        LVIS_TRAIN_IMAGES,
        setup_embed,
        "train + val features (D=2048 float16, 3 views) + pairs",
        "val = 0.198 x train images; 1 epoch",
    ),
    Case(
        "cluster",
        "stages.cluster",
        [],
        "val images",
        25_000,
        2500,
        LVIS_VAL_IMAGES,
        setup_cluster,
        f"val embeddings (d={EMBED_DIM} float32)",
        "k in 4, 8, 12 (elbow), 3 Lloyd iterations each",
    ),
    Case(
        "evaluate",
        "stages.evaluate",
        [],
        "val images",
        500,
        50,
        LVIS_VAL_IMAGES,
        setup_evaluate,
        f"val JSON + masks read ({EVALUATE_MASK_SIDE}²) + embeddings",
        f"{EVALUATE_IMAGE_SIZE} px images, 1203 categories, 100 clusters",
    ),
]


# ---------------------------------------------------------------------------------------------------- report


def _gb(kb: float) -> str:
    return f"{kb / (1 << 20):.2f} GB"


def _bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.0f} MB"


def project(case: Case) -> tuple[float, float, float]:
    """(a, b, peak at the LVIS size) in KB from the two measured points; b (KB per unit) floored at 0."""
    s1, s4 = case.results[1]["size"], case.results[4]["size"]
    p1, p4 = case.results[1]["self_kb"], case.results[4]["self_kb"]
    b = max(0.0, (p4 - p1) / (s4 - s1))
    a = p1 - b * s1
    return a, b, a + b * case.lvis


def verdict(case: Case) -> str:
    ratio = case.results[4]["self_kb"] / case.results[1]["self_kb"]
    _, _, peak = project(case)
    misses = []
    if ratio > TARGET_RATIO:
        misses.append(f"ratio > {TARGET_RATIO}")
    if peak / (1 << 20) >= TARGET_PEAK_GB:
        misses.append(f"LVIS >= {TARGET_PEAK_GB:.0f} GB")
    return "yes" if not misses else "**NO** (" + ", ".join(misses) + ")"


def print_table(cases: list[Case]) -> None:
    print(
        "\n| stage | size 1x (images / proposals / main data) | peak RSS 1x | peak RSS 4x | 4x / 1x "
        "| import only | LVIS v1 size | projected peak at LVIS v1 | meets target |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for case in cases:
        if 4 not in case.results:
            continue
        one, four = case.results[1], case.results[4]
        _, b, peak = project(case)
        size = f"{one['size']:,} {case.unit} / {one['proposals']:,} / {_bytes(one['bytes'])}"
        print(
            f"| {case.name} | {size} | {_gb(one['self_kb'])} | {_gb(four['self_kb'])} "
            f"| {four['self_kb'] / one['self_kb']:.2f} | {_gb(case.import_kb)} | {case.lvis:,} | {_gb(peak)} "
            f"| {verdict(case)} |"
        )
    print("\nWhat each row ran (main data: what 'bytes' counts; 4x is four times every count):\n")
    for case in cases:
        if 4 not in case.results:
            continue
        one, four = case.results[1], case.results[4]
        a, b, _ = project(case)
        children = max(one["children_kb"], four["children_kb"])
        extra = f"; its child processes peaked at {_gb(children)}" if children > 100 * 1024 else ""
        print(
            f"- {case.name}: {case.data}; {case.note}. Fit: {_gb(a)} + {b:.0f} KB per {case.unit[:-1]}; "
            f"{one['seconds']:.0f} s + {four['seconds']:.0f} s{extra}."
        )


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (ratios not meaningful)")
    parser.add_argument("--stages", default="", help="comma-separated subset of: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every 1x size by this")
    parser.add_argument("--workdir", type=Path, default=None, help="where the workspaces go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces (fabricated data, logs)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one stage run")
    args = parser.parse_args()
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    cases = [c for c in CASES if not wanted or c.name in wanted]
    workdir = Path(tempfile.mkdtemp(prefix="bench_memory-", dir=args.workdir))
    started = time.perf_counter()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"bench_memory: workspaces under {workdir}; {os.cpu_count()} CPUs, load average {load}")
    print("peak RSS = VmHWM of the stage process (`python -m stages.X` under a runpy wrapper)\n", flush=True)
    try:
        for case in cases:
            case.import_kb = import_peak_kb(case.module)
            base = case.quick if args.quick else max(1, round(case.size * args.scale))
            for factor in (1, 4):
                ws = workdir / f"{case.name.replace('@', '-')}-{factor}x"
                ws.mkdir(parents=True)
                t0 = time.perf_counter()
                info = case.setup(ws, base * factor)
                made = time.perf_counter() - t0
                run = run_stage(ws, case.module, case.args, ws / "stage.log", args.timeout)
                case.results[factor] = {"size": base * factor, **info, **run}
                print(
                    f"{case.name} {factor}x: {base * factor:,} {case.unit}, {info['proposals']:,} proposals, "
                    f"{_bytes(info['bytes'])} of data (made in {made:.0f} s); peak RSS {_gb(run['self_kb'])} "
                    f"in {run['seconds']:.0f} s",
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(ws)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(cases)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nTotal {time.perf_counter() - started:.0f} s (load average at the end {load}).")


if __name__ == "__main__":
    main()
