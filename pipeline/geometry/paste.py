"""Paste box-relative mask-head output into the image, bit for bit as torchvision's paste.

A proposal's mask is stored as the mask head's native M x M probability map, relative to its box.
The full-resolution mask is the deterministic paste of that map into the box (torchvision's own
`paste_masks_in_image`, the function Mask R-CNN uses), thresholded at 0.5. `paste_masks_tensor` computes it
on any device, bit-identical to torchvision's loop on the CPU (`paste_masks_reference`): on a GPU for all of
an image's masks at once (two batched matrix products with torchvision's own bilinear weights, no loop over the
masks), on the CPU by torchvision's own resize of each mask inside its box; `paste_masks` is its numpy form.
(RLE, IoU and polygons: pipeline.geometry.masks.)
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image

from pipeline.device import use_batched

log = logging.getLogger(__name__)


# The vectorised paste decides a pixel itself only when its sum lies farther than this from the threshold.
# Both sums use torchvision's own float32 weights: torchvision's float32 sum and ours (float32 products on
# the CPU, float64 on a GPU) are each within 2.5e-7 of the exact value (a few roundings of terms below 1);
# closer pixels (exact ties such as (127 + 128) / 2 / 255 are common) are decided by torchvision itself.
TIE_TOLERANCE = 2e-6
_CHUNK_PIXELS = 1 << 22  # masks pasted together: at most this many pixels (n x H x W) per chunk
_VERIFIED: dict[int, int] = {}  # mask side (padded) -> output sides whose weights equal torch's (checked once)
_UNVERIFIED: set[int] = set()  # sides whose weights did not match this torch build: the per-mask loop


def _as_tensor(values: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(values if isinstance(values, torch.Tensor) else np.asarray(values), dtype=dtype)


def _probabilities(masks: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    probs = _as_tensor(masks).to(device)
    return probs.float() / 255.0 if probs.dtype == torch.uint8 else probs.float()


def paste_masks_reference(
    masks: np.ndarray | torch.Tensor,
    boxes: np.ndarray | torch.Tensor,
    image_hw: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """torchvision's `paste_masks_in_image` on the CPU (a Python loop over the masks) >= threshold: (n, H, W) bool.

    The definition :func:`paste_masks_tensor` reproduces bit for bit; kept for the tests, the benchmark, and
    what it leaves to torchvision whole (thresholds of TIE_TOLERANCE or less, a torch build whose bilinear
    weights are not ours).
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    if len(masks) == 0:
        return torch.zeros((0, height, width), dtype=torch.bool)
    probs = _probabilities(_as_tensor(masks).cpu(), torch.device("cpu"))
    pasted = paste_masks_in_image(probs[:, None], _as_tensor(boxes, torch.float32).cpu(), (height, width))
    return pasted[:, 0] >= threshold


def _linear_taps(in_size: int, out_size: torch.Tensor, pos: torch.Tensor):
    """Source indices and float32 weights of bilinear resizes (align_corners=False) from `in_size` to
    `out_size` (n,) at output positions `pos` (n, L): ATen's CPU `compute_indices_weights_linear`, operation
    for operation. ATen's source coordinate ``scale * (i + 0.5) - 0.5`` is one fused multiply-add; in
    float64 it is exact, and one rounding to float32 gives the fused result."""
    scale = torch.full(out_size.shape, float(in_size), dtype=torch.float32, device=out_size.device) / out_size.float()
    src = (scale.double()[:, None] * (pos.double() + 0.5) - 0.5).float().clamp_min(0.0)
    i0 = src.floor().to(torch.int64).clamp_max(in_size - 1)
    l1 = (src - i0.float()).clamp(0.0, 1.0)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    l0 = 1.0 - l1
    same = (out_size == in_size)[:, None].expand_as(pos)  # ATen copies when the size does not change
    kept = pos.clamp(0, in_size - 1)
    one, zero = torch.ones((), device=pos.device), torch.zeros((), device=pos.device)
    return (
        torch.where(same, kept, i0),
        torch.where(same, kept, i1),
        torch.where(same, one, l0),
        torch.where(same, zero, l1),
    )


def _taps_match_torch(in_size: int, sizes: range) -> bool:
    """Does `_linear_taps` give F.interpolate's own (CPU) weights for every output side in `sizes`? One-hot inputs."""
    eye = torch.eye(in_size)[:, None, None, :]
    for size in sizes:
        ref = F.interpolate(eye, size=(1, size), mode="bilinear", align_corners=False)[:, 0, 0, :]
        i0, i1, l0, l1 = _linear_taps(in_size, torch.tensor([size]), torch.arange(size)[None])
        ours = torch.zeros((in_size, size))
        cols = torch.arange(size)
        ours.index_put_((i0[0], cols), l0[0], accumulate=True)
        ours.index_put_((i1[0], cols), l1[0], accumulate=True)
        if not torch.equal(ours, ref):
            return False
    return True


def _weights_verified(in_size: int, max_out: int) -> bool:
    """Checked against this torch build once per process and mask side, up to the largest side yet pasted."""
    if in_size in _UNVERIFIED:
        return False
    done = _VERIFIED.get(in_size, 0)
    if max_out > done:
        upto = max(max_out, 256, 2 * done)
        if not _taps_match_torch(in_size, range(done + 1, upto + 1)):
            _UNVERIFIED.add(in_size)
            log.warning("paste_masks: this torch build's bilinear weights differ from ours; pasting mask by mask")
            return False
        _VERIFIED[in_size] = upto
    return True


def _resize_matrix(side: int, out_size: torch.Tensor, start: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(n, L, side) float32: row p holds the bilinear weights of image position p (box-local p - start), two
    non-zero entries; rows where `inside` (n, L) is False are zero."""
    length = inside.shape[1]
    pos = torch.arange(length, device=inside.device)[None] - start[:, None]
    i0, i1, l0, l1 = _linear_taps(side, out_size, pos.clamp_min(0))
    zero = torch.zeros((), device=inside.device)
    matrix = torch.zeros((len(out_size), length, side), device=inside.device)
    matrix.scatter_add_(2, i0[..., None], torch.where(inside, l0, zero)[..., None])
    matrix.scatter_add_(2, i1[..., None], torch.where(inside, l1, zero)[..., None])
    return matrix


def _paste_chunk(
    maps: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, H, W) bool pastes of padded (n, S, S) maps into torchvision's integer boxes, and (n,) which have a
    pixel within TIE_TOLERANCE of the threshold. The paste is ``Rows @ map @ Cols^T``, two batched products
    with the bilinear weights as (n, H, S) and (n, W, S) matrices (zero rows outside the box)."""
    side, device = maps.shape[-1], maps.device
    x0, y0, x1, y1 = boxes.unbind(1)
    rows = torch.arange(height, device=device)[None]
    cols = torch.arange(width, device=device)[None]
    row_in = (rows >= y0.clamp_min(0)[:, None]) & (rows < torch.clamp(y1 + 1, max=height)[:, None])
    col_in = (cols >= x0.clamp_min(0)[:, None]) & (cols < torch.clamp(x1 + 1, max=width)[:, None])
    by_rows = _resize_matrix(side, (y1 - y0 + 1).clamp_min(1), y0, row_in)
    by_cols = _resize_matrix(side, (x1 - x0 + 1).clamp_min(1), x0, col_in)
    # float32 on the CPU; float64 elsewhere (no TF32 matmul on a GPU, whatever the global setting)
    dtype = torch.float32 if device.type == "cpu" else torch.float64
    pasted = torch.bmm(torch.bmm(by_rows.to(dtype), maps.to(dtype)), by_cols.to(dtype).transpose(1, 2))
    out = pasted >= threshold
    # NaN (a non-finite map: 0 x inf in the products) counts as a tie, so torchvision decides those masks too
    ties = ~((pasted - threshold).abs_().flatten(1).amin(1) > TIE_TOLERANCE)
    return out, ties


def paste_masks_tensor(
    masks: np.ndarray | torch.Tensor,
    boxes: np.ndarray | torch.Tensor,
    image_hw: tuple[int, int],
    threshold: float = 0.5,
    *,
    device: str | torch.device = "cpu",
    batched: bool | None = None,
) -> torch.Tensor:
    """Paste (n, M, M) box-relative maps (float probabilities in [0, 1], or uint8 in 0..255) into (n, H, W) bool
    masks on `device`, bit-identical to :func:`paste_masks_reference` (torchvision's loop on the CPU) on every
    device. A threshold of TIE_TOLERANCE or less (torchvision's 0 outside a box may pass it) takes torchvision's
    loop itself.

    ``batched`` (default: on every device but the CPU): all masks at once on `device`, with no loop over the
    masks: torchvision's `paste_masks_in_image` — the same expanded integer boxes, bilinear source indices and
    float32 weights — as two batched matrix products, then ``>= threshold``. A mask with a pixel within
    TIE_TOLERANCE of the threshold, where float32 rounding decides, is resized again by torchvision on the CPU,
    inside its box only (`_paste_in_boxes`; about 3 % of the embedded world's masks, mostly exact ties), and so
    is a mask whose products are not finite (a NaN or inf in its map).
    Not batched (the CPU's default): torchvision's own resize of each mask inside its box (`_paste_in_boxes`),
    which skips the image-sized products of the rest of the image: 1.8x faster than the batched products at
    128 px and 6.9x at 800 px on 2 CPU threads (README, "propose and sample"), where a GPU does the products
    in microseconds.
    """
    device = torch.device(device)
    height, width = int(image_hw[0]), int(image_hw[1])
    n = len(masks)
    if n == 0 or height == 0 or width == 0:
        return torch.zeros((n, height, width), dtype=torch.bool, device=device)
    if threshold <= TIE_TOLERANCE:  # torchvision's 0 outside the box may pass such a threshold: its whole paste
        return paste_masks_reference(masks, boxes, image_hw, threshold).to(device)
    if not use_batched(batched, device):
        pasted = torch.zeros((n, height, width), dtype=torch.bool)
        for mask, (window, inside) in zip(pasted, _paste_in_boxes(masks, boxes, image_hw, threshold), strict=True):
            mask[window] = inside
        return pasted.to(device)
    probs = _probabilities(masks, device)
    padded, scale = expand_masks(probs[:, None], padding=1)
    int_boxes = expand_boxes(_as_tensor(boxes, torch.float32).to(device), scale).to(dtype=torch.int64)
    side = int(padded.shape[-1])
    if not _weights_verified(side, int((int_boxes[:, 2:] - int_boxes[:, :2] + 1).max())):
        return paste_masks_reference(masks, boxes, image_hw, threshold).to(device)
    step = max(1, _CHUNK_PIXELS // max(1, height * width))
    chunks = [
        _paste_chunk(padded[lo : lo + step, 0], int_boxes[lo : lo + step], height, width, threshold)
        for lo in range(0, n, step)
    ]
    pasted = torch.cat([c[0] for c in chunks]) if len(chunks) > 1 else chunks[0][0]
    redo = torch.cat([c[1] for c in chunks]).nonzero().flatten().cpu()
    if len(redo):  # where float32 rounding decides: torchvision's own resize, on these masks only
        maps, box_t = _as_tensor(masks), _as_tensor(boxes)
        maps, box_t = maps[redo.to(maps.device)], box_t[redo.to(box_t.device)]
        windows = _paste_in_boxes(maps, box_t, image_hw, threshold)
        for i, (window, inside) in zip(redo.tolist(), windows, strict=True):
            pasted[i][window] = inside.to(device)
    return pasted


def _paste_in_boxes(
    masks: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor, image_hw: tuple[int, int], threshold: float
) -> list[tuple[tuple[slice, slice], torch.Tensor]]:
    """torchvision's `paste_mask_in_image` of each mask on the CPU, only where it is not 0: per mask the window
    of the image its box covers and the resized map there ``>= threshold`` (bool). The same expanded integer box,
    the same ``F.interpolate`` to the box's size and the same crop as torchvision's loop, without its image-sized
    buffer: outside the box torchvision pastes 0, which a threshold above TIE_TOLERANCE leaves False, as the
    batched paste does. At 800 px this is what makes a tied mask cheap (one resize of its box, not a copy of the
    image)."""
    height, width = int(image_hw[0]), int(image_hw[1])
    probs = _probabilities(_as_tensor(masks).cpu(), torch.device("cpu"))
    padded, scale = expand_masks(probs[:, None], padding=1)
    int_boxes = expand_boxes(_as_tensor(boxes, torch.float32).cpu(), scale).to(dtype=torch.int64)
    out = []
    for padded_map, (x0, y0, x1, y1) in zip(padded, int_boxes.tolist(), strict=True):
        size = (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))
        resized = F.interpolate(padded_map[None], size=size, mode="bilinear", align_corners=False)[0, 0]
        top, bottom, left, right = max(y0, 0), min(y1 + 1, height), max(x0, 0), min(x1 + 1, width)
        top, left = min(top, bottom), min(left, right)  # a box wholly outside the image: an empty window
        crop = resized[top - y0 : bottom - y0, left - x0 : right - x0] >= threshold
        out.append(((slice(top, bottom), slice(left, right)), crop))
    return out


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Paste (n, M, M) box-relative maps (float probabilities in [0, 1], or uint8 in 0..255) into (n, H, W) bool
    masks: :func:`paste_masks_tensor` on the CPU, as numpy.

    Bit-identical to torchvision's `paste_masks_in_image` thresholded at `threshold`, without its image-sized
    paste of each mask (each is resized inside its box only).
    """
    return paste_masks_tensor(masks, boxes, image_hw, threshold).numpy()
