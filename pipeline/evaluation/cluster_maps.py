"""Clusters to categories: the cluster x category count matrix and the two maps the protocol reports.

- `majority_map`: many-to-one; each cluster takes the most frequent category among its matched proposals.
  Ties go to the lowest category id. Clusters without any matched proposal stay unmapped.
- `hungarian_map`: one-to-one (RNCDL's protocol); scipy's `linear_sum_assignment` maximising the total
  count, rectangular matrices allowed. Clusters left without a category are dropped, and so are assigned
  pairs whose count is zero (a cluster never matched to that category gains nothing from the label).
  Among several optimal assignments the one scipy returns is kept (deterministic for a given matrix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.errors import PipelineError


def count_matrix(
    assignment: np.ndarray, matched_category: np.ndarray, k: int, category_ids: Sequence[int]
) -> np.ndarray:
    """(k, len(category_ids)) int64 counts of matched proposals per cluster (row) and category (column, in the
    order of `category_ids`). Unmatched proposals (category -1) are not counted."""
    assignment = np.asarray(assignment, dtype=np.int64)
    matched_category = np.asarray(matched_category, dtype=np.int64)
    ids = np.asarray(category_ids, dtype=np.int64)
    if assignment.shape != matched_category.shape:
        raise PipelineError(f"{len(assignment)} cluster assignments for {len(matched_category)} matched proposals")
    if len(assignment) and (assignment.min() < 0 or assignment.max() >= k):
        raise PipelineError(f"cluster assignments must lie in [0, {k}), got [{assignment.min()}, {assignment.max()}]")
    if len(np.unique(ids)) != len(ids):
        raise PipelineError("category ids must be unique")
    keep = matched_category >= 0
    rows, cats = assignment[keep], matched_category[keep]
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], cats)
    pos = np.minimum(pos, max(len(ids) - 1, 0))
    if len(cats) and (len(ids) == 0 or np.any(ids[order][pos] != cats)):
        missing = sorted(set(cats.tolist()) - set(ids.tolist()))
        raise PipelineError(f"matched categories {missing[:5]} are not among the ground truth's categories")
    cols = order[pos]
    flat = np.bincount(rows * len(ids) + cols, minlength=k * len(ids))
    return flat.reshape(k, len(ids)).astype(np.int64)


def majority_map(counts: np.ndarray, category_ids: Sequence[int]) -> dict[int, int]:
    """Many-to-one map cluster -> category id: the most frequent category (ties: lowest id); empty rows unmapped."""
    counts = np.asarray(counts)
    ids = np.asarray(category_ids, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != len(ids):
        raise PipelineError(f"count matrix of shape {counts.shape} does not fit {len(ids)} categories")
    if counts.size == 0:
        return {}
    order = np.argsort(ids, kind="stable")  # argmax takes the first maximum, so sort columns by id
    best = counts[:, order].argmax(axis=1)
    return {int(c): int(ids[order][best[c]]) for c in np.flatnonzero(counts.sum(axis=1) > 0)}


def hungarian_map(counts: np.ndarray, category_ids: Sequence[int]) -> dict[int, int]:
    """One-to-one map cluster -> category id maximising the summed counts; zero-count pairs dropped."""
    counts = np.asarray(counts)
    ids = np.asarray(category_ids, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != len(ids):
        raise PipelineError(f"count matrix of shape {counts.shape} does not fit {len(ids)} categories")
    if counts.size == 0:
        return {}
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(r): int(ids[c]) for r, c in zip(rows, cols, strict=True) if counts[r, c] > 0}


def labels_from_map(assignment: np.ndarray, cluster_to_category: Mapping[int, int]) -> np.ndarray:
    """Per proposal, the category id of its cluster under the map, or -1 when the cluster is unmapped."""
    assignment = np.asarray(assignment, dtype=np.int64)
    size = max(int(assignment.max()) + 1 if len(assignment) else 0, max(cluster_to_category, default=-1) + 1)
    table = np.full(size, -1, dtype=np.int64)
    for cluster, category in cluster_to_category.items():
        table[int(cluster)] = int(category)
    return table[assignment] if len(assignment) else np.zeros(0, dtype=np.int64)
