"""The fabricated LVIS v1-size inputs of benchmarks/bench_memory.py: annotation files in the real layout, stores,
a proposer checkpoint and params, written into a workspace (a module of the benchmark, not of the pipeline).

What is fabricated and why (object counts per image, polygon points, mask sides, the stores' attrs and fingerprint
chain that the stages check) is in bench_memory.py's docstring.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
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
