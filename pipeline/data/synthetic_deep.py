"""The deeper synthetic world (`data.synthetic.hierarchy: deep`): super-categories, and parts that have parts.

Three levels of categories, object > part > sub-part, on the flat world's long-tail plan:

- Levels. Ranks 1 and 2 are objects; one rank from each of equal strata of ranks 3..N is a dependent
  category (a fifth of N parts, an eighth sub-parts, the sub-parts spread over the dependent ranks after
  the first), so parts and sub-parts span all the frequency buckets. A sub-part has one or two parent
  *part* categories of lower rank (at most two sub-part categories per part); the parts that hold
  sub-parts ("carriers") sit alone at the centre of one or two objects of lower rank (grandparents,
  drawn big enough for visible sub-parts), every other part in one or two objects of lower rank with at
  most two part categories each. A rank below its parents' keeps the flat world's rule: a child category
  is placed in a subset of the images holding a parent.
- Super-categories (families). Every family is one outline shape, and its categories are colour/texture
  variants of it: categories of one family look alike, families differ in shape. Objects are dealt
  round-robin by rank into families of about 4.5 (so each family spans head to tail, like an LVIS
  super-category), carriers, other parts and sub-parts into families of their own shapes. A child's
  colours and texture differ from its parents', so that it stands out inside them.
- Layouts. A carrier fills the centre of its grandparent (relative radius ~0.5); its sub-parts sit at
  the centre (one sub-part category) or at opposite slots (two), at a relative radius ~0.4, so at the
  default image size (128) a sub-part instance covers ~30-80 pixels; visible sub-parts under 30 pixels
  are dropped (`synthetic_render.SUBPART_MIN_AREA`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.synthetic_design import SLOT_GROUPS, Category, PartLayout, _fits, name_and_number
from pipeline.data.synthetic_render import COLOURS, TEXTURES
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.data.synthetic import WorldSpec

DEEP_PART_FRACTION = 0.2  # share of categories that are parts (level 1)
SUBPART_FRACTION = 0.125  # share of categories that are sub-parts (level 2)
# family outline shapes per role, disjoint so that a shape names one family
OBJECT_FAMILY_SHAPES = ("circle", "square", "hexagon", "trapezoid", "ellipse", "pentagon")
CARRIER_FAMILY_SHAPES = ("octagon", "rectangle")  # roomy parts that hold sub-parts
PART_FAMILY_SHAPES = ("star", "cross", "flower", "ring", "dome")
SUBPART_FAMILY_SHAPES = ("diamond", "triangle")
OBJECTS_PER_FAMILY = 4.5
PARTS_PER_FAMILY = 2.5
SUB_SLOT_GROUPS: dict[str, tuple[tuple[float, float], ...]] = {
    "center": ((0.0, 0.0),),
    "top": ((0.0, -0.45),),
    "bottom": ((0.0, 0.45),),
    "left": ((-0.45, 0.0),),
    "right": ((0.45, 0.0),),
}
CARRIER_RELS = (0.52, 0.48, 0.44, 0.4)  # a carrier's radius relative to its grandparent's
SUB_RELS = (0.46, 0.42, 0.38, 0.34)  # a sub-part's radius relative to its carrier's
GRANDPARENT_MIN_SCALE = 0.21  # a grandparent's radius is at least this fraction of the image side
LEVEL_NAMES = ("object", "part", "subpart")


def _levels(rng: np.random.Generator, n: int) -> dict[int, int]:
    """Rank -> level (0 object, 1 part, 2 sub-part)."""
    n_part = int(round(DEEP_PART_FRACTION * n)) if n >= 4 else 0
    n_sub = int(round(SUBPART_FRACTION * n)) if n >= 8 else 0
    dependent: set[int] = set()
    if n_part + n_sub:
        edges = np.linspace(3, n + 1, n_part + n_sub + 1)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            choices = [r for r in range(int(math.ceil(lo)), int(math.ceil(hi))) if r not in dependent]
            if choices:
                dependent.add(int(rng.choice(choices)))
    ranks = sorted(dependent)
    sub_pos = {int(x) for x in np.round(np.linspace(1, len(ranks) - 1, n_sub))} if n_sub and len(ranks) > 1 else set()
    levels = {r: 0 for r in range(1, n + 1)}
    for i, r in enumerate(ranks):
        levels[r] = 2 if i in sub_pos else 1
    return levels


def _pick(rng: np.random.Generator, cands: list[int]) -> list[int]:
    k = 2 if len(cands) >= 2 and rng.random() < 0.3 else 1
    return sorted(int(x) for x in rng.choice(cands, size=k, replace=False))


def _clear(slots: tuple[tuple[float, float], ...], rel: float, taken: list[PartLayout]) -> bool:
    return all(
        math.hypot(p[0] - q[0], p[1] - q[1]) >= rel + t.rel_size + 0.05 for t in taken for p in slots for q in t.slots
    )


def _layout(
    rng: np.random.Generator,
    shape: str,
    rank: int,
    taken: list[PartLayout],
    groups: dict[str, tuple[tuple[float, float], ...]],
    names: list[str],
    rels: tuple[float, ...],
) -> PartLayout:
    """The first (largest) slot group among `names` that fits the parent outline clear of `taken`."""
    for rel in rels:
        for g in rng.permutation(names):
            slots = groups[str(g)]
            if _fits(shape, slots, rel) and _clear(slots, rel, taken):
                return PartLayout(part=rank, slots=slots, rel_size=rel)
    return PartLayout(part=rank, slots=((0.0, 0.0),), rel_size=0.15)  # a crowded parent: keep the world valid


def design_deep_world(spec: WorldSpec) -> tuple[list[Category], dict[int, list[PartLayout]]]:
    """The categories (index = rank - 1; `level` and `family` set) and, per parent rank (objects and the parts
    that hold sub-parts), the layouts of its children."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 1])))
    levels = _levels(rng, spec.n_categories)
    cats = [Category(rank=r, is_part=lv > 0, level=lv) for r, lv in sorted(levels.items())]
    by_level = {lv: [c for c in cats if c.level == lv] for lv in (0, 1, 2)}

    # sub-parts into lower-ranked parts (at most two sub-part categories each); those parts are carriers
    sub_load: dict[int, int] = {}
    for cat in by_level[2]:
        cands = [c.rank for c in by_level[1] if c.rank < cat.rank and sub_load.get(c.rank, 0) < 2]
        cands = cands or [c.rank for c in by_level[1] if c.rank < cat.rank]  # (cannot happen at N >= 8)
        cat.parents = _pick(rng, cands)
        for p in cat.parents:
            sub_load[p] = sub_load.get(p, 0) + 1
    carriers = set(sub_load)

    # parts into lower-ranked objects: a carrier alone in its grandparents, others two to an object at most
    part_load: dict[int, int] = {}
    for cat in by_level[1]:
        lower = [c.rank for c in by_level[0] if c.rank < cat.rank]
        if cat.rank in carriers:
            cands = [r for r in lower if part_load.get(r, 0) == 0]
        else:
            cands = [r for r in lower if part_load.get(r, 0) < 2]
        cat.parents = _pick(rng, cands or lower)
        for p in cat.parents:
            part_load[p] = part_load.get(p, 0) + (2 if cat.rank in carriers else 1)
    grandparents = {p for c in by_level[1] if c.rank in carriers for p in c.parents}

    # families: one outline shape each, its categories colour/texture variants of it (a child's colours and
    # texture differ from its parents', so that it stands out inside them)
    groups = [
        (by_level[0], OBJECT_FAMILY_SHAPES, OBJECTS_PER_FAMILY),
        ([c for c in by_level[1] if c.rank in carriers], CARRIER_FAMILY_SHAPES, PARTS_PER_FAMILY),
        ([c for c in by_level[1] if c.rank not in carriers], PART_FAMILY_SHAPES, PARTS_PER_FAMILY),
        (by_level[2], SUBPART_FAMILY_SHAPES, PARTS_PER_FAMILY),
    ]
    variants: dict[str, list[tuple[str, str]]] = {}  # family -> its (texture, colour) variants, in handing-out order
    for members, pool, per_family in groups:
        if not members:
            continue
        n_fam = min(len(pool), max(1, int(round(len(members) / per_family))))
        shapes = [str(s) for s in rng.permutation(pool)[:n_fam]]
        for i, cat in enumerate(members):  # round-robin by rank
            cat.shape = cat.family = shapes[i % n_fam]
        for shape in shapes:
            textures = [str(t) for t in rng.permutation(list(TEXTURES))]
            colours = [str(c) for c in rng.permutation(list(COLOURS))]
            # k -> (k % 7, k % 12) walks all 84 pairs, consecutive ones differing in texture and colour
            variants[shape] = [(textures[k % len(textures)], colours[k % len(colours)]) for k in range(84)]
    for cat in by_level[0] + by_level[1] + by_level[2]:  # parents before their children
        parents = [cats[p - 1] for p in cat.parents]
        avoid_colours = {c for p in parents for c in (p.colour, p.colour2)}
        avoid_textures = {p.texture for p in parents}
        free = variants[cat.family]
        if not free:
            raise PipelineError(f"synthetic world: family {cat.family!r} has no colour/texture variant left")
        loose = [v for v in free if v[1] not in avoid_colours]
        strict = [v for v in loose if v[0] not in avoid_textures]
        cat.texture, cat.colour = (strict or loose or free)[0]
        free.remove((cat.texture, cat.colour))
        other = [c for c in COLOURS if c != cat.colour]
        cat.colour2 = str(rng.choice([c for c in other if c not in avoid_colours] or other))

    for cat in cats:
        if cat.rank in grandparents:
            cat.size, cat.min_scale = float(rng.uniform(0.22, 0.27)), GRANDPARENT_MIN_SCALE
        elif cat.level == 0 and cat.rank in part_load:
            cat.size = float(rng.uniform(0.17, 0.23))
        elif cat.level == 0:
            cat.size = float(rng.uniform(0.09, 0.17))
        cat.tex_freq = float(rng.uniform(2.2, 3.6))
        cat.tex_angle = float(rng.uniform(0, np.pi))

    # layouts: carriers at the centre of their grandparents, other parts at disjoint slot groups, sub-parts
    # at the centre of their carrier (one sub-part category) or at opposite slots (two)
    layouts: dict[int, list[PartLayout]] = {}
    for cat in by_level[1] + by_level[2]:
        for p in cat.parents:
            parent = cats[p - 1]
            taken = layouts.setdefault(p, [])
            if cat.level == 2:
                names = ["center"] if sub_load[p] == 1 else ["top", "bottom", "left", "right"]
                lay = _layout(rng, parent.shape, cat.rank, taken, SUB_SLOT_GROUPS, names, SUB_RELS)
            elif cat.rank in carriers:
                lay = _layout(rng, parent.shape, cat.rank, taken, SLOT_GROUPS, ["center"], CARRIER_RELS)
            else:  # the centre only for a part alone in its parent, so that a second one still fits
                names = [g for g in SLOT_GROUPS if g != "center" or part_load[p] == 1]
                lay = _layout(rng, parent.shape, cat.rank, taken, SLOT_GROUPS, names, (0.3, 0.26, 0.22, 0.18))
            taken.append(lay)
            if p == cat.parents[0]:
                cat.size = lay.rel_size
    name_and_number(cats)
    return cats, layouts


def families(cats: list[Category]) -> list[dict]:
    """world.json's family (super-category) records, by name: shape, level and member category ids."""
    out: dict[str, dict] = {}
    for cat in sorted(cats, key=lambda c: c.id):
        record = {"name": cat.family, "shape": cat.shape, "level": cat.level, "category_ids": []}
        out.setdefault(cat.family, record)["category_ids"].append(cat.id)
    return [out[name] for name in sorted(out)]
