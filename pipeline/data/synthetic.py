"""The embedded default dataset: a deterministic synthetic "long-tail world" written in LVIS v1 format.

A world is a set of categories (coloured, textured shapes), some of which are *parts* that only ever
appear inside objects of particular parent categories (like a wheel inside a car), and two splits of
images in which those categories occur with LVIS-like long-tailed frequencies.

Design, in the order `generate_world` does it:

1. Categories. Each category is a unique (outline shape, texture, primary colour) triple with a second
   colour for its texture; shapes, textures and colours are each shared by several categories, so telling
   categories apart takes shape *and* colour *and* texture. A quarter of the categories are parts; each
   part has one or two parent categories (solid outlines) and a fixed layout inside them (one or two
   copies at given positions, a relative size). Ids are assigned alphabetically by name, as in LVIS.
2. Frequencies. Categories are ranked; the planned number of train images of rank r follows a
   Zipf-Mandelbrot law t(r) = T1 * ((r + q) / (1 + q)) ** -s with T1 = 0.85 * n_train, q = 0.75 * N, and s
   chosen so that the last rank gets ~2 images. At the default size this puts >= 5 categories in each
   LVIS bucket (rare: 1-10 train images, common: 11-100, frequent: > 100). A part's rank is always
   below its parents', so it can be placed in a subset of the images holding a parent. Val plans
   t(r) * n_val / n_train images per category, at least one, so every category (rare ones included)
   has val instances and APr is defined.
3. Placement. Per split, each object category is put into its planned number of images (drawn without
   replacement, weighted towards images with room left, at most `max_objects` top-level objects per
   image); some placements get a second instance; each part category is then put into the planned number
   of the images holding one of its parents, inside every parent instance there.
4. Rendering (numpy, vectorised per instance crop): a cluttered textured background (smooth colour
   noise, faint waves, faint unannotated blobs, sensor noise), then top-level objects in random order
   with intra-class variation (scale, aspect, rotation, colour jitter, texture phase), each followed by
   its parts, clipped to the parent's outline. Later objects occlude earlier ones; every instance is
   annotated with its VISIBLE mask (a parent's mask includes its parts' pixels, so a part's mask lies
   inside its parent's). Instances whose visible area is tiny (or under a fifth of their full outline)
   are dropped, with their parts. If that drops every instance of a planned category from an image, the
   layout is re-drawn (a few tries), so the planned counts hold.
5. Files: images/<split>/<id>.png, lvis_v1_<split>.json (LVIS v1: frequency/image_count/instance_count
   from the train split, neg_category_ids = a seeded sample of absent categories, exhaustive annotation
   so not_exhaustive_category_ids is empty), coco_base_train.json (COCO instances, base categories only)
   and world.json (the spec, per-category metadata, and the parent/child annotation id pairs).

Base categories (what the proposer is trained on, the world's "COCO"): every frequent category, plus every
other common category (taking them by descending train image count, starting with the first). No rare
category is ever base. Parts can be base, as COCO holds objects that sit on or inside others (a tie, a
clock on a tower): a proposer that never saw an annotated object inside another learns to suppress them
all, and then finds almost none of the novel parts (measured: 1% recall of novel parts, against 23% of
novel whole objects, when parts were excluded from the base set).

Everything is drawn from numpy Generators seeded from `spec.seed` (no global RNG), JSON is written
with sorted keys and fixed list orders, and PNGs with fixed settings, so the same spec gives
byte-identical files.

`spec.hierarchy = "deep"` designs a deeper world instead (`pipeline.data.synthetic_deep`): shape families
as super-categories and three levels, object > part > sub-part, on the same plan, placement and rendering
rules one level down; world.json then also lists the families, each category's level and super-category,
and the (object, sub-part) pairs under "relations_transitive" ("relations" holds the direct pairs of both
levels). The default "flat" world's files are the same bytes as before that option existed.

Code: `synthetic_design` (categories, layouts, the plan), `synthetic_render` (shapes, textures, drawing,
visible masks), `synthetic_deep` (the deeper world's design), this module (`WorldSpec`, `generate_world`,
the files).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pipeline.data.synthetic_deep import LEVEL_NAMES, design_deep_world, families
from pipeline.data.synthetic_design import (
    DUPLICATE_P,
    PARENT_SHAPES,
    PART_FRACTION,
    PART_SHAPES,
    SLOT_GROUPS,
    Category,
    PartLayout,
    design_world,
    plan_split,
    split_targets,
)
from pipeline.data.synthetic_render import (
    COLOURS,
    MAX_TRIES,
    SHAPES,
    TEXTURES,
    Instance,
    render_image,
    shape_mask,
    texture_colours,
)
from pipeline.errors import PipelineError

__all__ = [  # every public name of the module before it was split, plus the deep world's
    "COLOURS",
    "COMMON_MAX",
    "DUPLICATE_P",
    "HIERARCHIES",
    "MAX_TRIES",
    "NEG_PER_IMAGE",
    "PARENT_SHAPES",
    "PART_FRACTION",
    "PART_SHAPES",
    "RARE_MAX",
    "SHAPES",
    "SLOT_GROUPS",
    "SPLITS",
    "TEXTURES",
    "URL_ROOT",
    "Category",
    "Instance",
    "PartLayout",
    "WorldSpec",
    "design_deep_world",
    "design_world",
    "encode_rle",
    "generate_world",
    "plan_split",
    "render_image",
    "shape_mask",
    "spec_record",
    "split_targets",
    "texture_colours",
]

SPLITS = ("train", "val")
RARE_MAX = 10  # LVIS buckets: rare 1-10 train images, common 11-100, frequent > 100
COMMON_MAX = 100
NEG_PER_IMAGE = 8  # verified-absent categories listed per image (LVIS neg_category_ids)
URL_ROOT = "http://synthetic.local"
HIERARCHIES = ("flat", "deep")


@dataclass(frozen=True)
class WorldSpec:
    n_train: int = 400  # train images
    n_val: int = 120  # val images
    image_size: int = 128  # square images, pixels
    n_categories: int = 40  # object categories incl. parts
    max_objects: int = 6  # top-level objects per image (upper bound)
    seed: int = 0
    hierarchy: str = "flat"  # flat: objects > parts | deep: families of objects > parts > sub-parts


def spec_record(spec: WorldSpec) -> dict:
    """world.json's "spec": the fields, without `hierarchy` when flat (so the flat world's files stay as they
    were before the deep world existed)."""
    record = asdict(spec)
    if spec.hierarchy == "flat":
        del record["hierarchy"]
    return record


# ---------------------------------------------------------------------------------------------- files


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed RLE with str counts (same as pipeline.geometry.masks.encode_rle, without importing torch)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(x) for x in rle["size"]]}


def _bbox(mask: np.ndarray) -> list[float]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n")


def _check_spec(spec: WorldSpec) -> None:
    checks = [
        (spec.n_train >= 1, "n_train must be >= 1"),
        (spec.n_val >= 0, "n_val must be >= 0"),
        (spec.image_size >= 32, "image_size must be >= 32"),
        (1 <= spec.n_categories <= 400, "n_categories must be between 1 and 400"),
        (spec.max_objects >= 1, "max_objects must be >= 1"),
        (spec.n_train + spec.n_val <= 999_999, "at most 999999 images"),
        (spec.hierarchy in HIERARCHIES, f"hierarchy must be one of {' | '.join(HIERARCHIES)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise PipelineError(f"synthetic world: {msg} (got {spec})")


def generate_world(spec: WorldSpec, out_dir: Path, progress: bool = True) -> dict:
    """Write the world into out_dir; return a summary (counts per split and bucket, hierarchy fraction, base ids)."""
    _check_spec(spec)
    out_dir = Path(out_dir)
    deep = spec.hierarchy == "deep"
    cats, layouts = design_deep_world(spec) if deep else design_world(spec)
    targets = split_targets(spec, len(cats))
    size = spec.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    n_split = {"train": spec.n_train, "val": spec.n_val}
    first_id = {"train": 1, "val": spec.n_train + 1}

    images: dict[str, list[dict]] = {}
    anns: dict[str, list[dict]] = {}
    relations: dict[str, list[list[int]]] = {}  # (parent, child): object-part and part-subpart
    transitive: dict[str, list[list[int]]] = {}  # (object, sub-part), deep world only
    ann_id = 0
    for s_idx, split in enumerate(SPLITS):
        plan_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 2, s_idx])))
        plan = plan_split(spec, cats, n_split[split], targets[split], plan_rng)
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        images[split], anns[split], relations[split], transitive[split] = [], [], [], []
        iterator = enumerate(plan)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(plan), desc=f"world {split}", file=sys.stderr, leave=False)
        for i, (tops, parts, subs) in iterator:
            image_id = first_id[split] + i
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 3, s_idx, i])))
            img, insts, masks, parents = render_image(rng, spec, cats, layouts, tops, parts, (yy, xx), subs)
            file_name = f"{split}/{image_id:06d}.png"
            Image.fromarray(img, mode="RGB").save(out_dir / "images" / file_name, format="PNG", compress_level=1)
            ids_here: list[int] = []
            ann_ids: list[int] = []
            for inst, mask, parent in zip(insts, masks, parents, strict=True):
                ann_id += 1
                ann_ids.append(ann_id)
                cat = cats[inst.cat - 1]
                anns[split].append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cat.id,
                        "segmentation": encode_rle(mask),
                        "area": int(mask.sum()),
                        "bbox": _bbox(mask),
                    }
                )
                ids_here.append(cat.id)
                if parent >= 0:
                    relations[split].append([ann_ids[parent], ann_id])
                    if parents[parent] >= 0:
                        transitive[split].append([ann_ids[parents[parent]], ann_id])
            present = set(ids_here)
            absent = sorted(c.id for c in cats if c.id not in present)
            k = min(NEG_PER_IMAGE, len(absent))
            neg = sorted(int(x) for x in rng.choice(absent, size=k, replace=False)) if k else []
            images[split].append(
                {
                    "id": image_id,
                    "width": size,
                    "height": size,
                    "file_name": file_name,
                    "coco_url": f"{URL_ROOT}/{file_name}",
                    "license": 1,
                    "neg_category_ids": neg,
                    "not_exhaustive_category_ids": [],
                }
            )

    # frequencies from the train split
    image_count = {c.id: 0 for c in cats}
    instance_count = {c.id: 0 for c in cats}
    seen: set[tuple[int, int]] = set()
    for a in anns["train"]:
        instance_count[a["category_id"]] += 1
        if (a["image_id"], a["category_id"]) not in seen:
            seen.add((a["image_id"], a["category_id"]))
            image_count[a["category_id"]] += 1
    empty = sorted(cid for cid, n in image_count.items() if n == 0)
    if empty:
        raise PipelineError(
            f"synthetic world: {len(empty)} of {len(cats)} categories got no train image (the {spec.n_train} images "
            f"of at most {spec.max_objects} objects cannot hold the long-tail plan); raise data.synthetic.n_train or "
            "max_objects, or lower n_categories"
        )
    freq = {cid: ("r" if n <= RARE_MAX else "c" if n <= COMMON_MAX else "f") for cid, n in image_count.items()}
    base = _base_ids(cats, freq, image_count)

    by_id = sorted(cats, key=lambda c: c.id)
    rank_to_id = {c.rank: c.id for c in cats}
    categories = [
        {
            "id": c.id,
            "name": c.name,
            "synset": f"{c.name}.n.01",
            "synonyms": [c.name],
            "def": _describe(c, cats),
            "frequency": freq[c.id],
            "image_count": image_count[c.id],
            "instance_count": instance_count[c.id],
            **({"supercategory": c.family} if deep else {}),
        }
        for c in by_id
    ]
    info = {
        "description": "Synthetic long-tail world (LVIS v1 format)",
        "version": "1.0",
        "year": 2021,
        "contributor": "pipeline.data.synthetic",
        "url": URL_ROOT,
        "date_created": "2021-01-01",
    }
    licenses = [{"id": 1, "name": "CC0 1.0 (synthetic)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _write_json(
            out_dir / f"lvis_v1_{split}.json",
            {
                "info": info,
                "licenses": licenses,
                "images": images[split],
                "annotations": anns[split],
                "categories": categories,
            },
        )
    base_set = set(base)
    _write_json(
        out_dir / "coco_base_train.json",
        {
            "info": info,
            "licenses": licenses,
            "images": [
                {k: im[k] for k in ("id", "width", "height", "file_name", "coco_url", "license")}
                for im in images["train"]
            ],
            "annotations": [{**a, "iscrowd": 0} for a in anns["train"] if a["category_id"] in base_set],
            "categories": [
                {"id": c.id, "name": c.name, "supercategory": c.family if deep else "shape"}
                for c in by_id
                if c.id in base_set
            ],
        },
    )

    hier = {}
    n_instances = {}
    for split in SPLITS:
        n_instances[split] = len(anns[split])
        members = {x for pair in relations[split] for x in pair}
        hier[split] = round(len(members) / max(1, len(anns[split])), 4)
    buckets = {b: sum(1 for c in cats if freq[c.id] == b) for b in ("r", "c", "f")}
    world = {
        "spec": spec_record(spec),
        "buckets": {"rare": [1, RARE_MAX], "common": [RARE_MAX + 1, COMMON_MAX], "frequent": [COMMON_MAX + 1, None]},
        "base_rule": "frequent categories plus every other common category by descending train image count; never rare",
        "categories": [
            {
                "id": c.id,
                "name": c.name,
                "frequency": freq[c.id],
                "is_base": c.id in base_set,
                "is_part": c.is_part,
                "parent_ids": sorted(rank_to_id[p] for p in c.parents),
                "child_ids": sorted(rank_to_id[lay.part] for lay in layouts.get(c.rank, [])),
                "part_layouts": [
                    {"part_id": rank_to_id[lay.part], "slots": [list(s) for s in lay.slots], "rel_size": lay.rel_size}
                    for lay in layouts.get(c.rank, [])
                ],
                "shape": c.shape,
                "texture": c.texture,
                "colour": c.colour,
                "colour2": c.colour2,
                "planned_rank": c.rank,
                "image_count": {s: _count_images(anns[s], c.id) for s in SPLITS},
                "description": _describe(c, cats),
                **({"level": c.level, "supercategory": c.family} if deep else {}),
            }
            for c in by_id
        ],
        "relations": relations,  # [parent annotation id, part annotation id] per split
        "n_images": n_split,
        "n_instances": n_instances,
        "hierarchy_fraction": hier,
    }
    if deep:
        world["families"] = families(cats)  # super-categories: one outline shape each
        world["relations_transitive"] = transitive  # [object annotation id, sub-part annotation id] per split
    _write_json(out_dir / "world.json", world)
    return {
        "n_images": dict(n_split),
        "n_instances": n_instances,
        "n_categories": len(cats),
        "buckets": buckets,
        "hierarchy_fraction": hier,
        "n_relations": {s: len(relations[s]) for s in SPLITS},
        "base_category_ids": sorted(base),
        "part_category_ids": sorted(c.id for c in cats if c.is_part),
        "categories_missing_in_val": sorted(c.id for c in cats if _count_images(anns["val"], c.id) == 0),
        **(_deep_summary(cats, freq, anns, relations, transitive) if deep else {}),
    }


def _deep_summary(
    cats: list[Category],
    freq: dict[int, str],
    anns: dict[str, list[dict]],
    relations: dict[str, list[list[int]]],
    transitive: dict[str, list[list[int]]],
) -> dict:
    """The deep world's counts: categories per level (and per level and bucket), families, relations per level."""
    level_of_cat = {c.id: c.level for c in cats}
    out: dict = {
        "levels": {name: sum(c.level == lv for c in cats) for lv, name in enumerate(LEVEL_NAMES)},
        "level_buckets": {
            name: {b: sum(c.level == lv and freq[c.id] == b for c in cats) for b in ("r", "c", "f")}
            for lv, name in enumerate(LEVEL_NAMES)
        },
        "n_families": len({c.family for c in cats}),
        "n_instances_by_level": {},
        "n_relations_by_level": {},
        "n_relations_transitive": {s: len(transitive[s]) for s in SPLITS},
    }
    for split in SPLITS:
        level_of_ann = {a["id"]: level_of_cat[a["category_id"]] for a in anns[split]}
        out["n_instances_by_level"][split] = {
            name: sum(v == lv for v in level_of_ann.values()) for lv, name in enumerate(LEVEL_NAMES)
        }
        child_levels = [level_of_ann[child] for _, child in relations[split]]
        out["n_relations_by_level"][split] = {
            "object-part": child_levels.count(1),
            "part-subpart": child_levels.count(2),
        }
    return out


def _count_images(anns: list[dict], cid: int) -> int:
    return len({a["image_id"] for a in anns if a["category_id"] == cid})


def _base_ids(cats: list[Category], freq: dict[int, str], image_count: dict[int, int]) -> list[int]:
    base = [c.id for c in cats if freq[c.id] == "f"]
    common = sorted((c for c in cats if freq[c.id] == "c"), key=lambda c: (-image_count[c.id], c.id))
    base += [c.id for c in common[::2]]
    return sorted(base)


def _describe(cat: Category, cats: list[Category]) -> str:
    text = f"a {cat.colour} {cat.shape} with a {cat.texture} texture in {cat.colour2}"
    if cat.is_part:
        text += ", found inside " + " or ".join(cats[p - 1].name for p in cat.parents)
    return text
