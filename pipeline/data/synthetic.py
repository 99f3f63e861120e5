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
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pipeline.errors import PipelineError

SPLITS = ("train", "val")
RARE_MAX = 10  # LVIS buckets: rare 1-10 train images, common 11-100, frequent > 100
COMMON_MAX = 100
NEG_PER_IMAGE = 8  # verified-absent categories listed per image (LVIS neg_category_ids)
PART_FRACTION = 0.25  # share of categories that are parts
DUPLICATE_P = 0.2  # chance that an object placement gets a second instance (when the image has room)
MAX_TRIES = 6  # layouts tried per image before accepting one that lost a planned category
URL_ROOT = "http://synthetic.local"

COLOURS: dict[str, tuple[int, int, int]] = {
    "crimson": (200, 30, 45),
    "orange": (240, 130, 20),
    "gold": (235, 200, 40),
    "lime": (140, 210, 50),
    "green": (30, 125, 60),
    "teal": (20, 160, 160),
    "blue": (40, 80, 210),
    "purple": (130, 50, 170),
    "pink": (240, 120, 185),
    "brown": (120, 75, 40),
    "ivory": (238, 236, 225),
    "charcoal": (45, 45, 52),
}
TEXTURES: dict[str, str] = {  # texture -> the adjective in the category name
    "solid": "plain",
    "stripes": "striped",
    "checker": "checkered",
    "dots": "dotted",
    "gradient": "shaded",
    "radial": "glowing",
    "rings": "ringed",
}
# shape -> (aspect range); aspect stretches the local u axis
SHAPES: dict[str, tuple[float, float]] = {
    "circle": (1.0, 1.08),
    "ellipse": (1.5, 2.0),
    "square": (1.0, 1.08),
    "rectangle": (1.5, 2.1),
    "triangle": (1.0, 1.2),
    "diamond": (1.15, 1.45),
    "pentagon": (1.0, 1.1),
    "hexagon": (1.0, 1.1),
    "octagon": (1.0, 1.1),
    "star": (1.0, 1.1),
    "ring": (1.0, 1.15),
    "cross": (1.0, 1.15),
    "crescent": (1.0, 1.2),
    "flower": (1.0, 1.1),
    "dome": (1.1, 1.4),
    "arrow": (1.0, 1.2),
    "trapezoid": (1.2, 1.6),
}
PARENT_SHAPES = ("circle", "ellipse", "square", "rectangle", "hexagon", "octagon", "trapezoid")
PART_SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring", "flower")
# slot groups for parts inside a parent, in the parent's normalised frame (u right, v down)
SLOT_GROUPS: dict[str, tuple[tuple[float, float], ...]] = {
    "center": ((0.0, 0.0),),
    "top": ((0.0, -0.5),),
    "bottom": ((0.0, 0.5),),
    "pair_low": ((-0.42, 0.38), (0.42, 0.38)),
    "pair_high": ((-0.42, -0.38), (0.42, -0.38)),
    "pair_side": ((-0.5, 0.0), (0.5, 0.0)),
}


@dataclass(frozen=True)
class WorldSpec:
    n_train: int = 400  # train images
    n_val: int = 120  # val images
    image_size: int = 128  # square images, pixels
    n_categories: int = 40  # object categories incl. parts
    max_objects: int = 6  # top-level objects per image (upper bound)
    seed: int = 0


@dataclass
class Category:
    rank: int  # 1 = most frequent (planned)
    is_part: bool
    shape: str = ""
    texture: str = ""
    colour: str = ""
    colour2: str = ""
    size: float = 0.15  # typical radius, as a fraction of the image side (objects) or of the parent (parts)
    tex_freq: float = 3.0
    tex_angle: float = 0.0
    parents: list[int] = field(default_factory=list)  # ranks of the parent categories (parts)
    id: int = 0
    name: str = ""


@dataclass(frozen=True)
class PartLayout:
    part: int  # rank of the part category
    slots: tuple[tuple[float, float], ...]
    rel_size: float


@dataclass
class Instance:
    cat: int  # rank
    parent: int = -1  # index of the parent instance within the image, for parts
    cx: float = 0.0
    cy: float = 0.0
    scale: float = 1.0
    aspect: float = 1.0
    angle: float = 0.0
    colour: np.ndarray | None = None
    colour2: np.ndarray | None = None
    phase: float = 0.0


# ---------------------------------------------------------------------------------------------- shapes


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.hypot(u, v), np.arctan2(v, u)


def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    r, phi = _polar(u, v)
    sector = 2 * np.pi / n
    local = np.mod(phi + np.pi / 2, sector) - sector / 2  # a vertex points up
    return r * np.cos(local) <= np.cos(np.pi / n)


def _star(u: np.ndarray, v: np.ndarray, n: int = 5, inner: float = 0.45) -> np.ndarray:
    r, phi = _polar(u, v)
    sector = 2 * np.pi / n
    psi = np.abs(np.mod(phi + np.pi / 2 + sector / 2, sector) - sector / 2)  # angle from the nearest tip
    px, py = r * np.cos(psi), r * np.sin(psi)
    ax, ay = 1.0, 0.0
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # inside when p lies on the origin's side of the edge A-B
    cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    origin = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return cross * origin >= 0


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of a unit-size outline at normalised local coordinates (u, v)."""
    if shape in ("circle", "ellipse"):
        return u * u + v * v <= 1.0
    if shape in ("square", "rectangle"):
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        return _regular_polygon(u, v - 0.15, 3)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "pentagon":
        return _regular_polygon(u, v, 5)
    if shape == "hexagon":
        return _regular_polygon(u, v, 6)
    if shape == "octagon":
        return _regular_polygon(u, v, 8)
    if shape == "star":
        return _star(u, v)
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.55**2)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)
    if shape == "flower":
        r, phi = _polar(u, v)
        return r <= 0.7 + 0.3 * np.cos(5 * phi)
    if shape == "dome":
        w = v + 0.4
        return (u * u + (w - 0.4) ** 2 <= 1.0) & (w <= 0.4)
    if shape == "arrow":
        shaft = (np.abs(u) <= 0.3) & (v >= -0.2) & (v <= 0.95)
        head = (v >= -0.95) & (v < -0.2) & (np.abs(u) <= (v + 0.95) / 0.75 * 0.8)
        return shaft | head
    if shape == "trapezoid":
        return (np.abs(v) <= 0.8) & (np.abs(u) <= 0.62 + 0.35 * v)
    raise PipelineError(f"unknown synthetic shape {shape!r}")


def texture_colours(
    texture: str, u: np.ndarray, v: np.ndarray, c1: np.ndarray, c2: np.ndarray, freq: float, angle: float, phase: float
) -> np.ndarray:
    """(h, w, 3) float colours of a texture at normalised local coordinates."""
    if texture == "solid":
        t = np.zeros_like(u)
    elif texture == "stripes":
        w = u * np.cos(angle) + v * np.sin(angle)
        t = (np.sin(np.pi * freq * w + phase) > 0).astype(np.float32)
    elif texture == "checker":
        t = (np.mod(np.floor((u + 2 + phase / 7) * freq) + np.floor((v + 2) * freq), 2)).astype(np.float32)
    elif texture == "dots":
        f = freq * 1.3
        du = np.mod(u * f + phase / 6, 1.0) - 0.5
        dv = np.mod(v * f, 1.0) - 0.5
        t = (du * du + dv * dv < 0.09).astype(np.float32)
    elif texture == "gradient":
        w = u * np.cos(angle) + v * np.sin(angle)
        t = np.clip((w + 1) / 2, 0, 1)
    elif texture == "radial":
        t = np.clip(np.hypot(u, v), 0, 1)
    elif texture == "rings":
        t = (np.sin(np.pi * freq * np.hypot(u, v) + phase) > 0).astype(np.float32)
    else:
        raise PipelineError(f"unknown synthetic texture {texture!r}")
    t = t[..., None]
    return c1 * (1 - t) + c2 * t


# ---------------------------------------------------------------------------------------------- world design


def _zipf_targets(n_categories: int, n_images: int) -> np.ndarray:
    """Planned train image counts by rank (Zipf-Mandelbrot), as floats."""
    ranks = np.arange(1, n_categories + 1, dtype=np.float64)
    t1 = 0.85 * n_images
    t_last = 2.0
    q = 0.75 * n_categories
    if t1 <= t_last or n_categories == 1:
        return np.full(n_categories, max(t1, 1.0))
    s = math.log(t1 / t_last) / math.log((n_categories + q) / (1 + q))
    return t1 * ((ranks + q) / (1 + q)) ** (-s)


def _fits(shape: str, slots: tuple[tuple[float, float], ...], rel: float) -> bool:
    """True when discs of radius `rel` at every slot lie inside the parent outline (aspect 1, conservative)."""
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for su, sv in slots:
        pu = np.concatenate([[su], su + rel * np.cos(angles)])
        pv = np.concatenate([[sv], sv + rel * np.sin(angles)])
        if not shape_mask(shape, pu, pv).all():
            return False
    return True


def _overlap(a: tuple[tuple[float, float], ...], b: tuple[tuple[float, float], ...], rel: float) -> bool:
    return any(math.hypot(p[0] - q[0], p[1] - q[1]) < 2 * rel + 0.05 for p in a for q in b)


def design_world(spec: WorldSpec) -> tuple[list[Category], dict[int, list[PartLayout]]]:
    """The categories (index = rank - 1) and, per parent rank, the layouts of its parts."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 1])))
    n = spec.n_categories
    n_parts = int(round(PART_FRACTION * n)) if n >= 4 else 0
    # parts: one rank drawn from each of n_parts equal strata of ranks 3..n, so parts span all buckets
    part_ranks: set[int] = set()
    if n_parts:
        edges = np.linspace(3, n + 1, n_parts + 1)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            choices = [r for r in range(int(math.ceil(lo)), int(math.ceil(hi))) if r not in part_ranks]
            if choices:
                part_ranks.add(int(rng.choice(choices)))
    cats = [Category(rank=r, is_part=r in part_ranks) for r in range(1, n + 1)]

    # parents: earlier-ranked objects, at most two part categories each
    layouts: dict[int, list[PartLayout]] = {}
    parent_load: dict[int, int] = {}
    for cat in cats:
        if not cat.is_part:
            continue
        cands = [c.rank for c in cats[: cat.rank - 1] if not c.is_part and parent_load.get(c.rank, 0) < 2]
        if not cands:
            cat.is_part = False
            continue
        k = 2 if len(cands) >= 2 and rng.random() < 0.3 else 1
        cat.parents = sorted(int(x) for x in rng.choice(cands, size=k, replace=False))
        for p in cat.parents:
            parent_load[p] = parent_load.get(p, 0) + 1

    # shapes: parents get solid outlines; cycle through shuffled lists so every shape is shared
    parent_ranks = sorted(parent_load)
    parent_cycle = list(rng.permutation(PARENT_SHAPES))
    part_cycle = list(rng.permutation(PART_SHAPES))
    object_cycle = list(rng.permutation(list(SHAPES)))
    texture_cycle = list(rng.permutation(list(TEXTURES)))
    colour_cycle = list(rng.permutation(list(COLOURS)))
    used: set[tuple[str, str, str]] = set()
    counters = {"parent": 0, "part": 0, "object": 0}
    for i, cat in enumerate(cats):
        role = "part" if cat.is_part else ("parent" if cat.rank in parent_ranks else "object")
        cycle = {"parent": parent_cycle, "part": part_cycle, "object": object_cycle}[role]
        shape = str(cycle[counters[role] % len(cycle)])
        counters[role] += 1
        texture = str(texture_cycle[i % len(texture_cycle)])
        colour = str(colour_cycle[i % len(colour_cycle)])
        while (shape, texture, colour) in used:
            texture = str(rng.choice(list(TEXTURES)))
            colour = str(rng.choice(list(COLOURS)))
            if role == "object":
                shape = str(rng.choice(list(SHAPES)))
        used.add((shape, texture, colour))
        cat.shape, cat.texture, cat.colour = shape, texture, colour
        cat.colour2 = str(rng.choice([c for c in COLOURS if c != colour]))
        if role == "parent":
            cat.size = float(rng.uniform(0.17, 0.23))
        elif role == "object":
            cat.size = float(rng.uniform(0.09, 0.17))
        cat.tex_freq = float(rng.uniform(2.2, 3.6))
        cat.tex_angle = float(rng.uniform(0, np.pi))

    # part layouts inside their parents: disjoint slot groups that fit the parent outline
    group_names = list(SLOT_GROUPS)
    for cat in cats:
        for p in cat.parents:
            parent = cats[p - 1]
            taken = layouts.setdefault(p, [])
            chosen = None
            for rel in (0.3, 0.26, 0.22, 0.18):
                for g in rng.permutation(group_names):
                    slots = SLOT_GROUPS[str(g)]
                    if _fits(parent.shape, slots, rel) and not any(_overlap(slots, t.slots, rel) for t in taken):
                        chosen = PartLayout(part=cat.rank, slots=slots, rel_size=rel)
                        break
                if chosen:
                    break
            if chosen is None:  # cannot happen for the parent shapes above; keep the world valid anyway
                chosen = PartLayout(part=cat.rank, slots=((0.0, 0.0),), rel_size=0.15)
            taken.append(chosen)
            if cat.size == 0.15 or len(cat.parents) == 1:
                cat.size = chosen.rel_size

    # names and ids (alphabetical, as in LVIS)
    for cat in cats:
        cat.name = f"{cat.colour}_{TEXTURES[cat.texture]}_{cat.shape}"
    for i, cat in enumerate(sorted(cats, key=lambda c: c.name)):
        cat.id = i + 1
    return cats, layouts


# ---------------------------------------------------------------------------------------------- planning


def plan_split(
    spec: WorldSpec, cats: list[Category], n_images: int, targets: np.ndarray, rng: np.random.Generator
) -> list[tuple[list[int], dict[int, list[int]]]]:
    """Per image: the top-level category ranks, and for each top-level index the part ranks inside it."""
    cap = max(1, spec.max_objects)
    tops: list[list[int]] = [[] for _ in range(n_images)]
    load = np.zeros(n_images, dtype=np.int64)
    for cat in cats:
        if cat.is_part:
            continue
        want = int(min(targets[cat.rank - 1], n_images))
        avail = np.flatnonzero(load < cap)
        k = min(want, len(avail))
        if k <= 0:
            continue
        w = (cap - load[avail]).astype(np.float64) ** 2
        chosen = rng.choice(avail, size=k, replace=False, p=w / w.sum())
        for i in np.sort(chosen):
            tops[i].append(cat.rank)
            load[i] += 1
    objects = [c for c in cats if not c.is_part]
    head = np.array([c.rank for c in objects[: max(1, len(objects) // 4)]])
    for i in range(n_images):
        if not tops[i]:  # no empty images: add a head category
            tops[i].append(int(rng.choice(head)))
            load[i] += 1
        for rank in list(tops[i]):
            if load[i] < cap and rng.random() < DUPLICATE_P:
                tops[i].append(rank)
                load[i] += 1
    parts: list[dict[int, list[int]]] = [{} for _ in range(n_images)]
    for cat in cats:
        if not cat.is_part:
            continue
        holders = [i for i in range(n_images) if any(r in cat.parents for r in tops[i])]
        k = min(int(targets[cat.rank - 1]), len(holders))
        if k <= 0:
            continue
        chosen = np.sort(rng.choice(np.array(holders), size=k, replace=False))
        for i in chosen:
            for j, r in enumerate(tops[i]):
                if r in cat.parents:
                    parts[i].setdefault(j, []).append(cat.rank)
    return list(zip(tops, parts, strict=True))


def split_targets(spec: WorldSpec, n_categories: int) -> dict[str, np.ndarray]:
    base = _zipf_targets(n_categories, spec.n_train)
    train = np.maximum(1, np.round(base)).astype(np.int64)
    val = np.maximum(1, np.round(base * spec.n_val / max(spec.n_train, 1))).astype(np.int64)
    return {"train": train, "val": val}


# ---------------------------------------------------------------------------------------------- rendering


def _jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float32)
    c = c * rng.uniform(0.85, 1.12) + rng.normal(0, 8, 3)
    return np.clip(c, 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    base = rng.uniform(70, 190, 3)
    small = np.clip(base + rng.normal(0, 28, (6, 6, 3)), 0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    waves = np.zeros((size, size), dtype=np.float32)
    for _ in range(2):  # faint waves
        a = rng.uniform(0, np.pi)
        f = rng.uniform(0.08, 0.35)
        amp = np.float32(rng.uniform(4, 12))
        waves += amp * np.sin(
            np.float32(f * np.cos(a)) * xx + np.float32(f * np.sin(a)) * yy + np.float32(rng.uniform(0, 6.3))
        )
    img += waves[..., None]
    for _ in range(int(rng.integers(3, 8))):  # faint unannotated blobs and bars
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.04, 0.25, 2) * size
        a = rng.uniform(0, np.pi)
        ellipse = rng.random() < 0.6
        tint = rng.uniform(40, 220, 3).astype(np.float32)
        alpha = np.float32(rng.uniform(0.12, 0.3))
        reach = 1.5 * max(rx, ry)
        x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
        y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        dx, dy = xx[y0:y1, x0:x1] - np.float32(cx), yy[y0:y1, x0:x1] - np.float32(cy)
        u = (dx * np.float32(np.cos(a)) + dy * np.float32(np.sin(a))) / np.float32(rx)
        v = (-dx * np.float32(np.sin(a)) + dy * np.float32(np.cos(a))) / np.float32(ry)
        m = (u * u + v * v <= 1.0) if ellipse else ((np.abs(u) <= 1) & (np.abs(v) <= 1))
        region = img[y0:y1, x0:x1]
        region[m] = region[m] * (1 - alpha) + tint * alpha
    return img


class _Canvas:
    """Draws instances into an image, recording which instance owns each pixel."""

    def __init__(self, background: np.ndarray, yy: np.ndarray, xx: np.ndarray):
        self.img = background
        self.size = background.shape[0]
        self.owner = np.full(background.shape[:2], -1, dtype=np.int32)
        self.full: list[np.ndarray] = []  # full (unoccluded) outline of each instance, image-sized
        self.yy, self.xx = yy, xx

    def draw(self, inst: Instance, cat: Category, clip: np.ndarray | None) -> None:
        radius = inst.scale * max(inst.aspect, 1.0) * 1.45 + 2
        x0, x1 = max(0, int(inst.cx - radius)), min(self.size, int(math.ceil(inst.cx + radius)) + 1)
        y0, y1 = max(0, int(inst.cy - radius)), min(self.size, int(math.ceil(inst.cy + radius)) + 1)
        full = np.zeros((self.size, self.size), dtype=bool)
        if x1 > x0 and y1 > y0:
            dx = self.xx[y0:y1, x0:x1] - inst.cx
            dy = self.yy[y0:y1, x0:x1] - inst.cy
            cos, sin = math.cos(inst.angle), math.sin(inst.angle)
            u = (dx * cos + dy * sin) / (inst.scale * inst.aspect)
            v = (-dx * sin + dy * cos) / inst.scale
            m = shape_mask(cat.shape, u, v)
            if clip is not None:
                m &= clip[y0:y1, x0:x1]
            col = texture_colours(cat.texture, u, v, inst.colour, inst.colour2, cat.tex_freq, cat.tex_angle, inst.phase)
            col *= np.clip(1.0 - 0.12 * v, 0.8, 1.2)[..., None]  # a little shading
            region = self.img[y0:y1, x0:x1]
            region[m] = col[m]
            self.owner[y0:y1, x0:x1][m] = len(self.full)
            full[y0:y1, x0:x1] = m
        self.full.append(full)


def _place(
    rng: np.random.Generator,
    spec: WorldSpec,
    cats: list[Category],
    layouts: dict[int, list[PartLayout]],
    tops: list[int],
    parts: dict[int, list[int]],
) -> list[Instance]:
    """Geometry for every instance: top-level objects in a random order, each followed by its parts."""
    size = spec.image_size
    crowd = 1.0 / math.sqrt(max(1.0, len(tops) / 3.5))
    order = rng.permutation(len(tops))
    placed: list[tuple[float, float, float]] = []
    out: list[Instance] = []
    for j in order:
        cat = cats[tops[j] - 1]
        scale = cat.size * size * crowd * rng.uniform(0.82, 1.18)
        if cat.rank in layouts:
            scale = max(scale, 0.15 * size)  # parents stay big enough for visible parts
        aspect = rng.uniform(*SHAPES[cat.shape])
        extent = scale * math.sqrt(aspect)
        lo, hi = 0.6 * extent, size - 0.6 * extent
        best, best_gap = None, -np.inf
        for _ in range(25):
            cx, cy = rng.uniform(lo, hi, 2) if hi > lo else (size / 2, size / 2)
            gap = min((math.hypot(cx - px, cy - py) / (extent + pe) for px, py, pe in placed), default=np.inf)
            if gap > best_gap:
                best, best_gap = (float(cx), float(cy)), gap
            if gap >= 0.75:
                break
        cx, cy = best
        placed.append((cx, cy, extent))
        top = Instance(
            cat=cat.rank,
            cx=cx,
            cy=cy,
            scale=float(scale),
            aspect=float(aspect),
            angle=float(rng.uniform(0, 2 * np.pi)),
            colour=_jitter_colour(rng, COLOURS[cat.colour]),
            colour2=_jitter_colour(rng, COLOURS[cat.colour2]),
            phase=float(rng.uniform(0, 2 * np.pi)),
        )
        parent_index = len(out)
        out.append(top)
        by_part = {lay.part: lay for lay in layouts.get(cat.rank, [])}
        for prank in parts.get(int(j), []):
            lay = by_part[prank]
            pcat = cats[prank - 1]
            cos, sin = math.cos(top.angle), math.sin(top.angle)
            pangle = top.angle + rng.normal(0, 0.15)
            pcol, pcol2 = _jitter_colour(rng, COLOURS[pcat.colour]), _jitter_colour(rng, COLOURS[pcat.colour2])
            for su, sv in lay.slots:
                su, sv = su + rng.normal(0, 0.03), sv + rng.normal(0, 0.03)
                lx, ly = su * top.scale * top.aspect, sv * top.scale
                out.append(
                    Instance(
                        cat=prank,
                        parent=parent_index,
                        cx=top.cx + lx * cos - ly * sin,
                        cy=top.cy + lx * sin + ly * cos,
                        scale=float(lay.rel_size * top.scale * rng.uniform(0.9, 1.08)),
                        aspect=float(rng.uniform(*SHAPES[pcat.shape])),
                        angle=float(pangle),
                        colour=pcol,
                        colour2=pcol2,
                        phase=float(rng.uniform(0, 2 * np.pi)),
                    )
                )
    return out


def render_image(
    rng: np.random.Generator,
    spec: WorldSpec,
    cats: list[Category],
    layouts: dict[int, list[PartLayout]],
    tops: list[int],
    parts: dict[int, list[int]],
    grid: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, list[Instance], list[np.ndarray]]:
    """The RGB image, its kept instances and their visible masks (parents before their parts)."""
    size = spec.image_size
    yy, xx = grid
    min_area = max(12.0, 0.0015 * size * size)
    min_part_area = max(6.0, 0.0005 * size * size)
    planned = set(tops) | {r for rs in parts.values() for r in rs}
    best = None
    for _ in range(MAX_TRIES):
        canvas = _Canvas(_background(rng, size, yy, xx), yy, xx)
        insts = _place(rng, spec, cats, layouts, tops, parts)
        for inst in insts:
            clip = canvas.full[inst.parent] if inst.parent >= 0 else None
            canvas.draw(inst, cats[inst.cat - 1], clip)
        children: dict[int, list[int]] = {}
        for k, inst in enumerate(insts):
            if inst.parent >= 0:
                children.setdefault(inst.parent, []).append(k)
        top_of = np.array([k if inst.parent < 0 else inst.parent for k, inst in enumerate(insts)] + [-1])
        top_owner = top_of[canvas.owner]  # owner -1 (background) maps to the trailing -1
        kept: list[int] = []
        masks: list[np.ndarray] = []
        for k, inst in enumerate(insts):
            if inst.parent >= 0:
                continue
            own = top_owner == k
            area, full_area = int(own.sum()), int(canvas.full[k].sum())
            if area < min_area or area < 0.2 * full_area:
                continue
            kept.append(k)
            masks.append(own)
            for c in children.get(k, []):
                vis = canvas.owner == c
                if vis.sum() >= min_part_area:
                    kept.append(c)
                    masks.append(vis)
        noise = rng.standard_normal(canvas.img.shape, dtype=np.float32) * np.float32(3.0)
        img = np.clip(np.round(canvas.img + noise), 0, 255).astype(np.uint8)
        result = (img, [insts[k] for k in kept], masks)
        if {insts[k].cat for k in kept} >= planned:
            return result
        if best is None or len(kept) > len(best[1]):
            best = result
    return best


# ---------------------------------------------------------------------------------------------- files


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed RLE with str counts (same as pipeline.masks.encode_rle, without importing torch)."""
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
    ]
    for ok, msg in checks:
        if not ok:
            raise PipelineError(f"synthetic world: {msg} (got {spec})")


def generate_world(spec: WorldSpec, out_dir: Path, progress: bool = True) -> dict:
    """Write the world into out_dir; return a summary (counts per split and bucket, hierarchy fraction, base ids)."""
    _check_spec(spec)
    out_dir = Path(out_dir)
    cats, layouts = design_world(spec)
    targets = split_targets(spec, len(cats))
    size = spec.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    n_split = {"train": spec.n_train, "val": spec.n_val}
    first_id = {"train": 1, "val": spec.n_train + 1}

    images: dict[str, list[dict]] = {}
    anns: dict[str, list[dict]] = {}
    relations: dict[str, list[list[int]]] = {}
    ann_id = 0
    for s_idx, split in enumerate(SPLITS):
        plan_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 2, s_idx])))
        plan = plan_split(spec, cats, n_split[split], targets[split], plan_rng)
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        images[split], anns[split], relations[split] = [], [], []
        iterator = enumerate(plan)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(plan), desc=f"world {split}", file=sys.stderr, leave=False)
        for i, (tops, parts) in iterator:
            image_id = first_id[split] + i
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 3, s_idx, i])))
            img, insts, masks = render_image(rng, spec, cats, layouts, tops, parts, (yy, xx))
            file_name = f"{split}/{image_id:06d}.png"
            Image.fromarray(img, mode="RGB").save(out_dir / "images" / file_name, format="PNG", compress_level=1)
            ids_here: list[int] = []
            last_parent = 0
            for inst, mask in zip(insts, masks, strict=True):
                ann_id += 1
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
                if inst.parent < 0:
                    last_parent = ann_id
                else:
                    relations[split].append([last_parent, ann_id])
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
            "categories": [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in by_id if c.id in base_set],
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
        "spec": asdict(spec),
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
            }
            for c in by_id
        ],
        "relations": relations,  # [parent annotation id, part annotation id] per split
        "n_images": n_split,
        "n_instances": n_instances,
        "hierarchy_fraction": hier,
    }
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
    }


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
