"""Why a claim fails: what the sampled (parent, child) pairs really are, and whether the embedding learnt them.

L_hier and the hyperbolic geometry draw their signal from the (parent, child) proposal pairs the sampler
finds by mask containment. On the synthetic world the ground truth knows which annotation is a part of
which (world.json's `relations`), so each sampled pair can be checked against it through the proposals'
ground-truth matches (the evaluation's matching: highest mask IoU at or above 0.5).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.geometry.hyperbolic import dist0

PAIR_KINDS = ("object-part", "same instance", "other matched", "unmatched")


def pair_breakdown(pairs: np.ndarray, ann_id: np.ndarray, relations: Iterable[tuple[int, int]]) -> dict[str, int]:
    """Count sampled (parent, child) proposal pairs by the ground truth their two proposals match.

    - object-part: the parent proposal matches an instance and the child one of its parts;
    - same instance: both proposals match the same instance (a looser and a tighter mask of one object);
    - other matched: both match instances, neither the same one nor an annotated part of it;
    - unmatched: at least one proposal matches no instance (`ann_id` -1).
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    parent, child = np.asarray(ann_id)[pairs[:, 0]], np.asarray(ann_id)[pairs[:, 1]]
    matched = (parent >= 0) & (child >= 0)
    known = {(int(a), int(b)) for a, b in relations}
    part = matched & np.array([(int(a), int(b)) in known for a, b in zip(parent, child, strict=True)], dtype=bool)
    same = matched & (parent == child)
    counts = (part.sum(), same.sum(), (matched & ~part & ~same).sum(), (~matched).sum())
    return {kind: int(n) for kind, n in zip(PAIR_KINDS, counts, strict=True)}


def parent_nearer_origin(
    embeddings: np.ndarray, pairs: np.ndarray, geometry: str = "poincare", c: float = 1.0
) -> dict[str, float]:
    """Fraction of (parent, child) pairs whose parent lies nearer the origin, and the two mean distances.

    Distances to the origin are the ball's (`dist0`, float64) for the Poincaré geometry and Euclidean
    norms otherwise; NaN when there are no pairs.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return {"fraction": float("nan"), "d0_parent": float("nan"), "d0_child": float("nan")}
    d0 = np.asarray(dist0(x, c), dtype=np.float64) if geometry == "poincare" else np.linalg.norm(x, axis=-1)
    parent, child = d0[pairs[:, 0]], d0[pairs[:, 1]]
    return {
        "fraction": float(np.mean(parent < child)),
        "d0_parent": float(parent.mean()),
        "d0_child": float(child.mean()),
    }
