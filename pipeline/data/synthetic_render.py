"""Rendering of the synthetic world (`pipeline.data.synthetic`): the visual vocabulary (colours, textures,
outline shapes), a cluttered background, instance geometry (`_place`) and `render_image`, which draws an
image's instances parents first and returns each kept instance's VISIBLE mask.

A parent's mask includes the pixels of everything drawn inside it (its parts, and their sub-parts in the
deep world), so every child mask lies inside its parent's; children are clipped to their parent's outline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.data.synthetic import WorldSpec
    from pipeline.data.synthetic_design import Category, PartLayout

MAX_TRIES = 6  # layouts tried per image before accepting one that lost a planned category
SUBPART_MIN_AREA = 30.0  # pixels: smaller visible sub-parts are dropped (parts: 0.05% of the image)

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
    subs: dict[int, list[int]],
) -> list[Instance]:
    """Geometry for every instance: top-level objects in a random order, each followed by its parts (each
    part instance followed by its sub-parts)."""
    size = spec.image_size
    crowd = 1.0 / math.sqrt(max(1.0, len(tops) / 3.5))
    order = rng.permutation(len(tops))
    placed: list[tuple[float, float, float]] = []
    out: list[Instance] = []
    for j in order:
        cat = cats[tops[j] - 1]
        scale = cat.size * size * crowd * rng.uniform(0.82, 1.18)
        if cat.rank in layouts:
            scale = max(scale, cat.min_scale * size)  # parents stay big enough for visible parts
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
        out.append(top)
        _place_children(rng, cats, layouts, out, len(out) - 1, parts.get(int(j), []), subs)
    return out


def _place_children(
    rng: np.random.Generator,
    cats: list[Category],
    layouts: dict[int, list[PartLayout]],
    out: list[Instance],
    parent_index: int,
    ranks: list[int],
    subs: dict[int, list[int]],
) -> None:
    """Append the instances of the child categories `ranks` inside out[parent_index], at their layout's slots
    (one colour per child category and parent instance); each part's own children (`subs`) follow it."""
    top = out[parent_index]
    by_part = {lay.part: lay for lay in layouts.get(top.cat, [])}
    for prank in ranks:
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
            if subs.get(prank):  # the deep world's sub-parts, inside this part instance
                _place_children(rng, cats, layouts, out, len(out) - 1, subs[prank], {})


def render_image(
    rng: np.random.Generator,
    spec: WorldSpec,
    cats: list[Category],
    layouts: dict[int, list[PartLayout]],
    tops: list[int],
    parts: dict[int, list[int]],
    grid: tuple[np.ndarray, np.ndarray],
    subs: dict[int, list[int]] | None = None,
) -> tuple[np.ndarray, list[Instance], list[np.ndarray], list[int]]:
    """The RGB image, its kept instances, their visible masks and each one's parent (its position in the kept
    list, -1 for top-level objects); parents come before their children.

    A top-level object's mask holds every pixel drawn for it or inside it, a part's its own and its
    sub-parts' pixels, a sub-part's its own. An object is dropped when its visible area is tiny or under a
    fifth of its outline, a part or sub-part when its visible area is tiny; either way with its children.
    """
    subs = subs or {}
    size = spec.image_size
    yy, xx = grid
    min_area = max(12.0, 0.0015 * size * size)
    min_part_area = max(6.0, 0.0005 * size * size)
    min_sub_area = max(SUBPART_MIN_AREA, 0.0018 * size * size)
    planned = set(tops) | {r for rs in parts.values() for r in rs} | {r for rs in subs.values() for r in rs}
    best = None
    for _ in range(MAX_TRIES):
        canvas = _Canvas(_background(rng, size, yy, xx), yy, xx)
        insts = _place(rng, spec, cats, layouts, tops, parts, subs)
        for inst in insts:
            clip = canvas.full[inst.parent] if inst.parent >= 0 else None
            canvas.draw(inst, cats[inst.cat - 1], clip)
        children: dict[int, list[int]] = {}
        top_of: list[int] = []  # each instance's top-level ancestor (itself for objects)
        part_of: list[int] = []  # each instance's part ancestor (itself for parts, -1 for objects)
        for k, inst in enumerate(insts):
            if inst.parent >= 0:
                children.setdefault(inst.parent, []).append(k)
            top_of.append(k if inst.parent < 0 else top_of[inst.parent])
            part_of.append(-1 if inst.parent < 0 else k if insts[inst.parent].parent < 0 else part_of[inst.parent])
        top_owner = np.array(top_of + [-1])[canvas.owner]  # owner -1 (background) maps to the trailing -1
        part_owner = np.array(part_of + [-1])[canvas.owner]
        kept: list[int] = []
        masks: list[np.ndarray] = []
        parents: list[int] = []
        for k, inst in enumerate(insts):
            if inst.parent >= 0:
                continue
            own = top_owner == k
            area, full_area = int(own.sum()), int(canvas.full[k].sum())
            if area < min_area or area < 0.2 * full_area:
                continue
            top_pos = len(kept)
            kept.append(k)
            masks.append(own)
            parents.append(-1)
            for c in children.get(k, []):
                vis = part_owner == c
                if vis.sum() < min_part_area:
                    continue
                part_pos = len(kept)
                kept.append(c)
                masks.append(vis)
                parents.append(top_pos)
                for g in children.get(c, []):
                    sub_vis = canvas.owner == g
                    if sub_vis.sum() >= min_sub_area:
                        kept.append(g)
                        masks.append(sub_vis)
                        parents.append(part_pos)
        noise = rng.standard_normal(canvas.img.shape, dtype=np.float32) * np.float32(3.0)
        img = np.clip(np.round(canvas.img + noise), 0, 255).astype(np.uint8)
        result = (img, [insts[k] for k in kept], masks, parents)
        if {insts[k].cat for k in kept} >= planned:
            return result
        if best is None or len(kept) > len(best[1]):
            best = result
    return best
