"""World design of the synthetic world (`pipeline.data.synthetic`): categories, part layouts and the
long-tail plan (Zipf-Mandelbrot targets, and per split which categories go into which image).

`design_world` is the flat world (one level of parts under objects); `pipeline.data.synthetic_deep`
designs the deeper one (super-categories, parts that have parts) with the same `Category` / `PartLayout`
records, and `plan_split` plans both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.synthetic_render import COLOURS, SHAPES, TEXTURES, shape_mask

if TYPE_CHECKING:
    from pipeline.data.synthetic import WorldSpec

PART_FRACTION = 0.25  # share of categories that are parts
DUPLICATE_P = 0.2  # chance that an object placement gets a second instance (when the image has room)
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
    level: int = 0  # 0: object, 1: part (inside objects), 2: sub-part (inside parts; deep world only)
    family: str = ""  # super-category (deep world only)
    min_scale: float = 0.15  # an object holding parts is drawn at least this radius, as a fraction of the image


@dataclass(frozen=True)
class PartLayout:
    part: int  # rank of the part (or sub-part) category
    slots: tuple[tuple[float, float], ...]
    rel_size: float


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

    for cat in cats:
        cat.level = 1 if cat.is_part else 0
    name_and_number(cats)
    return cats, layouts


def name_and_number(cats: list[Category]) -> None:
    """Names from the looks, ids alphabetical by name (as in LVIS)."""
    for cat in cats:
        cat.name = f"{cat.colour}_{TEXTURES[cat.texture]}_{cat.shape}"
    for i, cat in enumerate(sorted(cats, key=lambda c: c.name)):
        cat.id = i + 1


# ---------------------------------------------------------------------------------------------- planning


# per image: the top-level category ranks; per top-level index, the part ranks inside it; per part rank,
# the sub-part ranks inside every instance of that part in the image (empty in the flat world)
ImagePlan = tuple[list[int], dict[int, list[int]], dict[int, list[int]]]


def plan_split(
    spec: WorldSpec, cats: list[Category], n_images: int, targets: np.ndarray, rng: np.random.Generator
) -> list[ImagePlan]:
    """Per image: the top-level category ranks, the parts inside them and the sub-parts inside those.

    Every category goes into its planned number of images (`targets`, by rank) where it can: objects into
    images with room left, parts into images holding a parent, sub-parts into images holding a parent part.
    """
    cap = max(1, spec.max_objects)
    tops: list[list[int]] = [[] for _ in range(n_images)]
    load = np.zeros(n_images, dtype=np.int64)
    for cat in cats:
        if cat.level > 0:
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
    objects = [c for c in cats if c.level == 0]
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
        if cat.level != 1:
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
    subs: list[dict[int, list[int]]] = [{} for _ in range(n_images)]
    present = [{r for rs in parts[i].values() for r in rs} for i in range(n_images)]
    for cat in cats:  # (none in the flat world: no draws, so its plan is unchanged)
        if cat.level != 2:
            continue
        holders = [i for i in range(n_images) if present[i] & set(cat.parents)]
        k = min(int(targets[cat.rank - 1]), len(holders))
        if k <= 0:
            continue
        chosen = np.sort(rng.choice(np.array(holders), size=k, replace=False))
        for i in chosen:
            for r in sorted(present[i] & set(cat.parents)):
                subs[i].setdefault(r, []).append(cat.rank)
    return list(zip(tops, parts, subs, strict=True))


def split_targets(spec: WorldSpec, n_categories: int) -> dict[str, np.ndarray]:
    base = _zipf_targets(n_categories, spec.n_train)
    train = np.maximum(1, np.round(base)).astype(np.int64)
    val = np.maximum(1, np.round(base * spec.n_val / max(spec.n_train, 1))).astype(np.int64)
    return {"train": train, "val": val}
