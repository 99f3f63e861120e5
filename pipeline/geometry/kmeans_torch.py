"""The torch float64 search of the nearest-centroid assignment (pipeline.geometry.kmeans_assign), all on one device:
the rows' ``x''``, the GEMM ``x'' . y''_j``, its two smallest entries per row and the certificate, so that the
CPU's share of a block is the winners' reference values (numpy's bits, as `assign_exact` computes them) and the
rows left open.

The same bounds as the CPU's (kmeans_terms): the GEMM's ``gamma`` holds in any summation order, and so does the
direct differences' relative error ``(d + 7) u`` (a sum of non-negative terms), so a row certified here has the
rule's winner. The device's bits may differ from numpy's in ``x''`` and ``|x - m|^2``; that can only change which
rows are certified (the others are decided on the CPU), never an assignment.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pipeline.geometry.kmeans_terms import _U64, Side, _ceiling_margin, _eta, _overflow_limit

_DEVICE_TILE = 1 << 25  # elements of one float64 GEMM tile on the device (256 MB)


class DeviceSide(NamedTuple):
    """The centroids' side (kmeans_terms.Side) on the device: what the search and the certificate read."""

    cent: torch.Tensor  # (K, d) float64
    weight: torch.Tensor  # (K,) a_j
    centre: torch.Tensor  # (d,) p
    base: torch.Tensor  # (d + 2, K) the float64 columns y''_j
    big: float
    weight_max: float
    spread: float


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float64 array on ``device`` (copied first when read-only, e.g. memory-mapped: torch would warn)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    return torch.from_numpy(a if a.flags.writeable else a.copy()).to(device)


def device_side(side: Side, device: torch.device) -> DeviceSide:
    """``side``'s arrays copied to ``device``."""
    cent, weight, centre, base = (_to_device(a, device) for a in (side.cent, side.weight, side.centre, side.base))
    return DeviceSide(cent, weight, centre, base, side.big, side.weight_max, side.spread)


def smallest_two(tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``tile`` (overwritten), the index of its smallest entry and the smallest of the others, in two
    reductions (CUDA's ``topk`` selects by radix, 2 bits a pass over the row: up to 32 passes in float64; these
    were 7.5x faster on a 22,951 x 1,462 tile of an H100). An exact tie of the two fails the certificate, whichever
    index wins it."""
    j1 = tile.argmin(dim=1)
    tile.scatter_(1, j1[:, None], torch.inf)
    return j1, tile.amin(dim=1)


def augment(xt: torch.Tensor, side: DeviceSide) -> torch.Tensor:
    """``x'' = (x - p, |x - p|^2, 1)`` (b, d + 2), as kmeans_terms._augment."""
    xc = xt - side.centre
    r2 = (xc * xc).sum(dim=1, keepdim=True)
    return torch.cat([xc, r2, torch.ones_like(r2)], dim=1)


def fits(xa: torch.Tensor, side: DeviceSide) -> torch.Tensor:
    """Rows whose float64 GEMM cannot overflow, as kmeans_terms._fits (NaN and inf compare False: not fitting)."""
    return side.weight_max * (xa[:, -2].sqrt() + side.spread) ** 2 < _overflow_limit(_U64)


class Search(NamedTuple):
    """A block's search, queued on the device (`queue`) and brought back by `collect`."""

    j1: torch.Tensor  # (b,) the smallest GEMM entry's centroid
    second: torch.Tensor  # (b,) the smallest of the other entries: a lower bound of every other centroid's t
    ceiling: torch.Tensor  # (b,) j1's t, rounded up past every error of its computation
    fits: torch.Tensor  # (b,) bool
    largest: torch.Tensor  # () max |x''| over the fitting rows (the underflow term)


def queue(xb: np.ndarray, side: DeviceSide) -> Search:
    """The search of the rows ``xb`` (b, d) float64, queued on ``side``'s device in tiles of ``_DEVICE_TILE``
    elements (nothing waits for the device here but the copy of ``xb``)."""
    k, d = side.cent.shape
    xt = _to_device(xb, side.base.device)
    margin = _ceiling_margin(d)  # as kmeans_tiles._certify
    parts = []
    step = max(1, _DEVICE_TILE // k)
    for i in range(0, len(xt), step):
        x = xt[i : i + step]
        xa = augment(x, side)
        fit = fits(xa, side)
        j1, second = smallest_two(xa @ side.base)
        diff = x - side.cent[j1]
        ceiling = (diff * diff).sum(dim=1) * side.weight[j1] * margin
        largest = torch.where(fit[:, None], xa.abs(), 0.0).amax()
        parts.append((j1, second, ceiling, fit, largest))
    if not parts:
        empty = xt.new_zeros(0)
        return Search(empty.long(), empty, empty, empty.bool(), xt.new_zeros(()))
    j1, second, ceiling, fit, largest = zip(*parts, strict=True)
    return Search(torch.cat(j1), torch.cat(second), torch.cat(ceiling), torch.cat(fit), torch.stack(largest).amax())


def collect(search: Search, side: DeviceSide) -> tuple[np.ndarray, np.ndarray]:
    """``(j1 int32, certified bool)`` of a queued search: certified where j1's ceiling is under the lower bound of
    every other centroid less the underflow term (kmeans_terms._eta of the block's fitting rows) and the row's
    GEMM could not overflow."""
    terms = side.base.shape[0]  # x'''s, as kmeans_tiles reads them off its rows
    eta = _eta(_U64, terms, np.array([search.largest.item()]), side.big)  # max |x''| is all _eta reads of them
    certified = search.fits & (search.ceiling < search.second - eta)
    return search.j1.to(torch.int32).cpu().numpy(), certified.cpu().numpy()
