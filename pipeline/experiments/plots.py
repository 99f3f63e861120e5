"""The pictures. Figures are drawn on matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pycocotools.mask as mask_utils  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.data.annotation_stream import (  # noqa: E402
    annotations_of,
    load_image_records,
    stream_items,
    top_level_value,
)
from pipeline.data.lvis_format import AnnotationFile, image_path, load_image  # noqa: E402
from pipeline.geometry.masks import annotation_rle  # noqa: E402

_BUCKETS = "f = frequent (> 100 train images), c = common (11-100), r = rare (1-10)"


def _ann_mask(ann: dict, height: int, width: int) -> np.ndarray:
    return mask_utils.decode(annotation_rle(ann["segmentation"], height, width)).astype(bool)


def _category_colour(cat_id: int) -> np.ndarray:
    """A stable, well separated colour per category id (golden-angle hues)."""
    hue = (cat_id * 0.618033988749895) % 1.0
    sat = 0.75 + 0.2 * ((cat_id * 7) % 3) / 2
    val = 0.95 - 0.25 * ((cat_id * 5) % 2)
    return np.asarray(matplotlib.colors.hsv_to_rgb((hue, sat, val)))


def _label_point(mask: np.ndarray) -> tuple[float, float]:
    """A point inside the mask near its centroid (the centroid itself may fall outside a ring or crescent)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return float(xs[k]), float(ys[k])


def dataset_preview(
    lvis_json: Path,
    image_root: Path,
    out_png: Path,
    n: int = 12,
    seed: int = 0,
    summary: AnnotationFile | None = None,
) -> None:
    """A grid of `n` seeded-random annotated images: masks as translucent colours with outlines, category names.

    The file is streamed, never parsed whole; `summary` (its `validate_lvis` result) saves the passes that
    would find its images, categories and annotated images again, so only the chosen images' annotations
    are read.
    """
    what = "LVIS annotations"
    if summary is None:
        all_images = load_image_records(lvis_json, what)
        categories = top_level_value(lvis_json, what, "categories", [])
        annotated = {int(i) for i in stream_items(lvis_json, what, "annotations.item.image_id")}
    else:
        all_images, categories = summary.images, summary.categories
        annotated = set(summary.annotated_image_ids.tolist())
    cats = {c["id"]: c for c in categories}
    images = sorted((im for im in all_images if im["id"] in annotated), key=lambda im: im["id"])
    if not images:
        images = sorted(all_images, key=lambda im: im["id"])
    k = min(n, len(images))
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = [images[i] for i in np.sort(rng.choice(len(images), size=k, replace=False))] if k else []
    by_image = annotations_of(lvis_json, what, [im["id"] for im in chosen])

    cols = min(4, max(1, k))
    rows = max(1, int(np.ceil(k / cols)))
    fig = Figure(figsize=(3.3 * cols, 3.55 * rows + 0.5), dpi=110)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")
    n_total = len(all_images)
    fig.suptitle(
        f"{Path(lvis_json).name}: {k} of {n_total} images, {len(cats)} categories",
        fontsize=12,
        fontweight="bold",
    )
    for slot in range(rows * cols):
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.set_axis_off()
        if slot >= k:
            continue
        im = chosen[slot]
        pixels = load_image(image_path(im, Path(image_root)))
        height, width = pixels.shape[:2]
        anns = sorted(by_image.get(im["id"], []), key=lambda a: -float(a.get("area", 0)))
        overlay = pixels.astype(np.float32) / 255.0
        drawn = []
        for ann in anns:
            mask = _ann_mask(ann, int(im.get("height", height)), int(im.get("width", width)))
            if mask.shape != (height, width) or not mask.any():
                continue
            colour = _category_colour(int(ann["category_id"]))
            overlay[mask] = overlay[mask] * 0.6 + colour * 0.4
            drawn.append((ann, mask, colour))
        ax.imshow(overlay, interpolation="nearest", extent=(0, width, height, 0))
        xs, ys = np.arange(width + 2) - 0.5, np.arange(height + 2) - 0.5  # pixel centres of the padded mask
        for _, mask, colour in drawn:
            ax.contour(xs, ys, np.pad(mask, 1).astype(np.float32), levels=[0.5], colors=[colour * 0.55], linewidths=1.0)
        for ann, mask, colour in drawn[:14]:  # label the largest instances
            x, y = _label_point(mask)
            cat = cats.get(ann["category_id"], {})
            name = str(cat.get("name", ann["category_id"])).replace("_", " ")
            ax.text(
                x,
                y,
                textwrap.fill(name, 14),
                fontsize=5.2,
                ha="center",
                va="center",
                color="black",
                linespacing=0.9,
                bbox={"boxstyle": "round,pad=0.15", "fc": (*colour, 0.75), "ec": "none"},
                clip_on=True,
            )
        counts: dict[str, int] = {}
        for ann, _, _ in drawn:
            f = cats.get(ann["category_id"], {}).get("frequency", "?")
            counts[f] = counts.get(f, 0) + 1
        detail = " ".join(f"{counts[f]}{f}" for f in ("f", "c", "r") if f in counts)
        ax.set_title(f"image {im['id']} · {len(drawn)} instances ({detail})", fontsize=8)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    fig.text(
        0.5,
        0.005,
        f"instances per LVIS bucket in each title: {_BUCKETS}; masks tinted and outlined in a colour per category",
        ha="center",
        va="bottom",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    _save(fig, out_png)


def _save(fig: Figure, out_png: Path) -> None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", facecolor="white", bbox_inches="tight")  # legends below axes included


def proposal_overlay(
    pixels: np.ndarray, boxes: np.ndarray, scores: np.ndarray, masks: np.ndarray, out_png: Path, title: str = ""
) -> None:
    """One image with its proposals: tinted masks, outlines, boxes and scores (rank 1 = highest score)."""
    height, width = pixels.shape[:2]
    fig = Figure(figsize=(6.5, 6.5 * height / max(width, 1) + 0.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    overlay = pixels.astype(np.float32) / 255.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    colours = [_category_colour(rank + 1) for rank in range(len(order))]
    for rank in order[::-1]:  # highest score painted last, on top
        overlay[masks[rank]] = overlay[masks[rank]] * 0.55 + colours[rank] * 0.45
    ax.imshow(overlay, interpolation="nearest", extent=(0, width, height, 0))
    xs, ys = np.arange(width + 2) - 0.5, np.arange(height + 2) - 0.5
    for pos, rank in enumerate(order):
        colour = colours[rank] * 0.6
        if masks[rank].any():
            ax.contour(xs, ys, np.pad(masks[rank], 1).astype(np.float32), levels=[0.5], colors=[colour], linewidths=1)
        x1, y1, x2, y2 = (float(v) for v in boxes[rank])
        ax.add_patch(matplotlib.patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=0.8, ls="--"))
        label = {"boxstyle": "round,pad=0.1", "fc": (*colours[rank], 0.8), "ec": "none"}
        ax.text(x1, y1, f"{pos + 1}:{float(scores[rank]):.2f}", fontsize=6, va="bottom", bbox=label, clip_on=True)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title or f"{len(scores)} proposals", fontsize=9)
    fig.tight_layout()
    _save(fig, out_png)


def elbow_plot(curve: list[tuple[int, float]], elbow: int | None, chosen: int, out_png: Path, title: str = "") -> None:
    """Inertia against k, the elbow (knee) and the k that was used marked; ``elbow`` None: k was fixed, so no
    sweep ran (the curve is the used k's single point, and the plot says so)."""
    fig = Figure(figsize=(6, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ks, inertia = [k for k, _ in curve], [v for _, v in curve]
    ax.plot(ks, inertia, "o-", color="#1f5fa8", lw=1.5, ms=4)
    if elbow is not None:
        ax.axvline(elbow, color="#c0392b", ls="--", lw=1, label=f"elbow k = {elbow}")
    if chosen != elbow:
        ax.axvline(chosen, color="#27ae60", ls=":", lw=1.5, label=f"used k = {chosen}")
    if elbow is None:
        note = f"k is fixed (cluster.k = {chosen}): the elbow sweep over cluster.k_range was skipped"
        box = {"facecolor": "white", "edgecolor": "#999999", "alpha": 0.9}
        ax.text(0.5, 0.1, note, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, bbox=box)
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("inertia (sum of squared distances)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, out_png)


def poincare_disk(
    points: np.ndarray,
    labels: np.ndarray,
    bucket: np.ndarray,
    category_names: dict[int, str],
    hier_pairs: np.ndarray,
    out_png: Path,
    title: str = "",
    top: int = 8,
) -> None:
    """Two panels of the disk: coloured by LVIS bucket of the matched category, and by the `top` categories;
    parent -> child pairs drawn as thin grey segments (a parent should sit nearer the centre).

    `labels`: matched category id per point (-1 unmatched); `bucket`: 'r'/'c'/'f' or '' per point."""
    fig = Figure(figsize=(12, 6.3), dpi=110)
    FigureCanvasAgg(fig)
    colours = {"f": "#1f77b4", "c": "#ff7f0e", "r": "#d62728", "": "#bbbbbb"}
    names = {"f": "frequent", "c": "common", "r": "rare", "": "unmatched"}
    for panel in range(2):
        ax = fig.add_subplot(1, 2, panel + 1)
        ax.add_patch(matplotlib.patches.Circle((0, 0), 1.0, fill=False, ec="black", lw=1))
        for parent, child in hier_pairs[:400]:
            ax.plot(*points[[parent, child]].T, color="0.55", lw=0.4, alpha=0.6, zorder=1)
        if len(hier_pairs):
            ax.scatter(*points[hier_pairs[:400, 0]].T, marker="^", s=14, facecolors="none", edgecolors="black",
                       lw=0.5, zorder=3, label="parent of a pair")  # fmt: skip
        if panel == 0:
            for key in ("", "f", "c", "r"):
                sel = bucket == key
                ax.scatter(*points[sel].T, s=5, c=colours[key], label=f"{names[key]} ({sel.sum()})", zorder=2)
            ax.set_title("by LVIS frequency bucket of the matched category", fontsize=9)
        else:
            ids, counts = np.unique(labels[labels >= 0], return_counts=True)
            best = ids[np.argsort(-counts, kind="stable")[:top]]
            other = ~np.isin(labels, best)
            ax.scatter(*points[other].T, s=4, c="#dddddd", label="other / unmatched", zorder=2)
            for i, cat in enumerate(best):
                sel = labels == cat
                ax.scatter(*points[sel].T, s=6, color=matplotlib.colormaps["tab10"](i % 10), zorder=2,
                           label=f"{category_names.get(int(cat), cat)} ({sel.sum()})")  # fmt: skip
            ax.set_title(f"the {len(best)} most matched categories", fontsize=9)
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.legend(fontsize=6, loc="lower left", bbox_to_anchor=(0.0, -0.12), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out_png)


def bucket_ap_bars(metrics: dict[str, dict], out_png: Path, title: str = "") -> None:
    """AP, APr, APc, APf bars for each protocol row (majority, hungarian, oracle); missing values left out."""
    keys = ("AP", "APr", "APc", "APf")
    rows = [row for row in ("majority", "hungarian", "oracle") if row in metrics]
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [metrics[row].get(k) for k in keys]
        xs = np.arange(len(keys)) + (i - (len(rows) - 1) / 2) * width
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=row)
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if value is None else f"{value:.3f}"
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(keys)), keys)
    ax.set_ylabel("LVIS mask AP")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out_png)
