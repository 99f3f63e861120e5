"""Centroid updates of k-means (pipeline.geometry.kmeans), streamed over blocks of rows: per-group sums only.

- Einstein midpoint (Poincaré ball, the default): the closed form of `hyperbolic.einstein_midpoint` in two
  passes: ``S_0`` and ``S_{1:}`` per group in the first, then ``S_0 - |S_{1:}|`` (which needs the direction ``u``
  of ``S_{1:}``) in the second.
- Fréchet mean: `hyperbolic.frechet_mean`'s Karcher steps from the streamed Einstein midpoint, one pass
  per step (per-group sums of ``logmap`` and of the Lipschitz term).
- Euclidean mean: per-group float64 sums over counts.

The per-row terms are those of `pipeline.geometry.hyperbolic` (the same torch expressions) and the per-group sums are
``index_add_`` in row order, so the results equal the one-shot functions on the whole array (bit for bit where
torch's row-wise kernels do not depend on the number of rows; tests/geometry/test_kmeans.py checks to 1e-12).
Empty groups give NaN (the caller keeps their old centroid).

The block operations run on one torch thread each (`_one_thread`): a block is a few MB, so per-operation parallel
start-up dominates (measured on 2 busy cores: 10x slower with 2 threads). The parallelism is across blocks
instead: ``workers`` threads compute the per-row terms of consecutive blocks at once (torch releases the GIL;
`_update` keeps blocks under ``_THREADED_ELEMENTS`` on the calling thread),
and the sums are still taken one block after the other in row order, so the results do not depend on it, bit for
bit. At most ``workers + 1`` blocks are held at once.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.geometry import hyperbolic as hyp
from pipeline.geometry.kmeans_blocks import blocks, read_block, rows_per_block

# Blocks smaller than this (elements) have their terms computed on the calling thread: each torch call on them is
# too short, and threads would spend the time handing the GIL to one another (d = 16, 65,536-row blocks: an update
# took 0.04 s on 2 threads against 0.02 s on one; d = 256, 16,384-row blocks: 1.7x faster on 2 threads).
_THREADED_ELEMENTS = 1 << 21

#: a fresh iterator over (rows float64 (b, d), groups int (b,)) blocks covering every point once, per pass
Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tensors(xb: np.ndarray, gb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if not xb.flags.writeable:  # a view of a read-only array: torch wants a writable buffer
        xb = xb.copy()
    return torch.from_numpy(xb), torch.from_numpy(np.asarray(gb, dtype=np.int64))


def _sums(
    read: Blocks, n_groups: int, terms: Callable[..., tuple[torch.Tensor, ...]], workers: int = 1
) -> list[torch.Tensor]:
    """Per-group sums (``index_add_`` in row order) of the per-row ``terms(x, groups)`` over every block, the
    terms of up to ``workers`` blocks computed at once on a thread pool."""
    sums: list[torch.Tensor] = []

    def block_terms(xb: np.ndarray, gb: np.ndarray) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x, g = _tensors(xb, gb)
        return g, terms(x, g)

    def add(g: torch.Tensor, values: tuple[torch.Tensor, ...]) -> None:
        if not sums:
            sums.extend(v.new_zeros((n_groups, *v.shape[1:])) for v in values)
        for total, v in zip(sums, values, strict=True):
            total.index_add_(0, g, v)

    if workers <= 1:
        for xb, gb in read():
            add(*block_terms(xb, gb))
        return sums
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for xb, gb in read():
            pending.append(pool.submit(block_terms, xb, gb))
            if len(pending) > workers:
                add(*pending.popleft().result())
        while pending:
            add(*pending.popleft().result())
    return sums


def einstein_midpoint_blocks(read: Blocks, n_groups: int, c: float = 1.0, *, workers: int = 1) -> torch.Tensor:
    """Per-group Einstein midpoint (n_groups, d) float64 tensor of the blocks ``read()`` yields, in two passes;
    equals ``hyperbolic.einstein_midpoint(x, c=c, groups=..., n_groups=...)`` of the whole array."""
    sc = c**0.5

    def radial(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nx = hyp._norm(x)
        r = sc * nx
        gap = hyp._gap(r)
        return nx, r, gap, gap * (1 + r)

    def first(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, r, _, d = radial(x)
        return (1 + r * r) / (sc * d), 2 * x / d

    s0, ss = _sums(read, n_groups, first, workers)
    ns = hyp._norm(ss)
    e1 = torch.zeros_like(ss)
    e1[..., 0] = 1
    u = torch.where(ns > 0, ss / ns.clamp_min(torch.finfo(ss.dtype).tiny), e1)

    def second(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nx, r, gap, d = radial(x)
        xhat = x / nx.clamp_min(hyp._MIN_NORM)
        angle = ((u[g] - xhat) ** 2).sum(-1, keepdim=True) / 2  # 1 - cos(angle between u and x)
        return (gap / (sc * (1 + r)) + (2 * nx / d) * angle,)

    (lower,) = _sums(read, n_groups, second, workers)  # S_0 - |S_{1:}|
    nu = (c * lower * (s0 + ns)).sqrt()
    return ss / (nu + sc * s0)


def frechet_mean_blocks(
    read: Blocks, n_groups: int, c: float = 1.0, *, iters: int = 100, tol: float = 1e-10, workers: int = 1
) -> torch.Tensor:
    """Per-group Fréchet mean (n_groups, d) of the blocks ``read()`` yields: the Karcher steps of
    ``hyperbolic.frechet_mean`` (same step size, same stopping rule), one pass over the blocks per step."""
    sc = c**0.5
    m = einstein_midpoint_blocks(read, n_groups, c, workers=workers)
    (total,) = _sums(read, n_groups, lambda x, g: (x.new_ones((len(x), 1)),), workers)
    for _ in range(iters):

        def terms(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor = m) -> tuple[torch.Tensor, ...]:
            m_rows = m[g]
            sd = (sc * hyp.dist(m_rows, x, c).unsqueeze(-1)).clamp_min(1e-6)
            return sd / torch.tanh(sd), hyp.logmap(m_rows, x, c)

        lip_sum, step_sum = _sums(read, n_groups, terms, workers)
        step = step_sum / (total * (lip_sum / total))
        moved = 2 * hyp._norm(step) / hyp._den(m, c)  # Riemannian length lambda_m |step| = distance moved
        m = hyp.expmap(m, step, c, project=False)
        if not bool((moved > tol).any()):
            break
    return m


def mean_blocks(read: Blocks, n_groups: int, *, workers: int = 1) -> np.ndarray:
    """Per-group Euclidean mean (n_groups, d) float64 of the blocks ``read()`` yields (empty groups: NaN)."""
    total, count = _sums(read, n_groups, lambda x, g: (x, x.new_ones((len(x), 1))), workers)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).numpy()


def _update(
    x: Any,
    assignment: np.ndarray,
    k: int,
    c: float | None,
    centroid: str,
    old: np.ndarray,
    *,
    block_rows: int | None = None,
) -> np.ndarray:
    """New centroids of the clusters ``assignment`` of the rows of ``x`` (read block by block): ``centroid``
    "einstein" / "frechet" (Poincaré ball of curvature -c) or "mean" (Euclidean); empty clusters keep ``old``.
    The blocks' terms run on as many threads as torch's intra-op count (the same results whatever it is)."""
    step = rows_per_block(x, block_rows)
    first_block = min(step, x.shape[0]) * x.shape[1]  # elements: every block but the last has as many
    workers = max(1, torch.get_num_threads()) if first_block >= _THREADED_ELEMENTS else 1

    def read() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in blocks(x.shape[0], step):
            yield read_block(x, s), assignment[s]

    with torch.no_grad(), _one_thread():
        if centroid == "einstein":
            new = einstein_midpoint_blocks(read, k, c, workers=workers).numpy()
        elif centroid == "frechet":
            new = frechet_mean_blocks(read, k, c, workers=workers).numpy()
        else:
            new = mean_blocks(read, k, workers=workers)
    keep = ~np.isfinite(new).all(axis=1)  # empty clusters keep their centroid
    new[keep] = old[keep]
    return new
