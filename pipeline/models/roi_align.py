"""Multi-scale RoIAlign whose CPU backward is one sparse matrix product (the proposer's training hot spot).

torchvision's CPU `roi_align` backward walks every (RoI, channel, bin, sample) and recomputes the bilinear
weights for each channel, in one thread: on 128 px images it took ~30 % of a training step at one thread and
more at two (the rest of the step is multi-threaded). RoIAlign is linear in the features: with F the feature
map as an (N*H*W, C) matrix and W the (K*PH*PW, N*H*W) matrix of bilinear weights (at most 4 * s * s non-zeros
per bin, s the sampling ratio), the output is W @ F and the gradient of the features is W^T @ G. Here the
forward stays torchvision's kernel (the same values, so inference and the training forward are unchanged) and
the backward builds W^T once per call, shared by all channels, and multiplies: ~15x faster on the proposer's
shapes, and the same gradient up to the order of float additions (tests/models/test_roi_align.py compares it with
torchvision's: ~1e-6 relative).

Only the CPU path with a fixed sampling ratio (> 0) uses it; anything else (CUDA, whose backward is fast, or
adaptive sampling) is torchvision's own.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def roi_align_weights(
    rois: Tensor, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int, shape: tuple[int, ...]
) -> Tensor:
    """W^T as a sparse COO (N*H*W, K*PH*PW) float32 matrix: the bilinear weights of torchvision's CPU
    `roi_align` (aligned=False) for `rois` (K, 5: batch index, x1, y1, x2, y2) over features of `shape`
    (N, C, H, W). Samples outside [-1, H] x [-1, W] weigh nothing, as in the kernel."""
    n, _, height, width = shape
    pooled_h, pooled_w = output_size
    s = int(sampling_ratio)
    k = rois.shape[0]
    rois = rois.detach().float()
    x1, y1 = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    roi_w = (rois[:, 3] * spatial_scale - x1).clamp(min=1.0)
    roi_h = (rois[:, 4] * spatial_scale - y1).clamp(min=1.0)
    samples = torch.arange(s, dtype=torch.float32) + 0.5

    def axis(start: Tensor, length: Tensor, pooled: int, size: int):
        """Per (roi, bin, sample) along one axis: low and high cell, their weights, whether it counts."""
        bin_size = (length / pooled)[:, None, None]
        bins = torch.arange(pooled, dtype=torch.float32)[None, :, None]
        # the kernel's float32 expression, in its order: start + bin * size + (sample + .5) * size / s
        v = (start[:, None, None] + bins * bin_size) + samples[None, None, :] * bin_size / s
        inside = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0.0)
        low = v.long()
        top = low >= size - 1
        low = torch.where(top, size - 1, low)
        high = torch.where(top, size - 1, low + 1)
        v = torch.where(top, low.float(), v)
        frac = v - low
        return low, high, 1.0 - frac, frac, inside  # each (K, pooled, s)

    y_lo, y_hi, wy_lo, wy_hi, y_in = axis(y1, roi_h, pooled_h, height)
    x_lo, x_hi, wx_lo, wx_hi, x_in = axis(x1, roi_w, pooled_w, width)

    def along_y(t: Tensor) -> Tensor:  # (K, PH, s) -> (K, PH, s, 1, 1)
        return t[:, :, :, None, None]

    def along_x(t: Tensor) -> Tensor:  # (K, PW, s) -> (K, 1, 1, PW, s)
        return t[:, None, None, :, :]

    count = s * s
    valid = (along_y(y_in) & along_x(x_in)).float() / count
    base = (rois[:, 0].long() * (height * width))[:, None, None, None, None]
    bins = torch.arange(k * pooled_h * pooled_w).reshape(k, pooled_h, 1, pooled_w, 1)
    bins = bins.expand(k, pooled_h, s, pooled_w, s).reshape(-1)
    rows, weights = [], []
    for y, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for x, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            rows.append((base + along_y(y) * width + along_x(x)).reshape(-1))
            weights.append((along_y(wy) * along_x(wx) * valid).reshape(-1))
    indices = torch.stack([torch.cat(rows), bins.repeat(4)])
    size = (n * height * width, k * pooled_h * pooled_w)
    return torch.sparse_coo_tensor(indices, torch.cat(weights), size, check_invariants=False)


class _RoIAlignSparseGrad(torch.autograd.Function):
    """torchvision's `roi_align` forward; backward = W^T @ grad (see the module docstring)."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int):
        ctx.save_for_backward(rois)
        ctx.meta = (tuple(features.shape), features.dtype, tuple(output_size), float(spatial_scale), sampling_ratio)
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        shape, dtype, output_size, spatial_scale, sampling_ratio = ctx.meta
        n, c, h, w = shape
        if rois.shape[0] == 0:
            return torch.zeros(shape, dtype=dtype), None, None, None, None
        weights = roi_align_weights(rois, spatial_scale, output_size, sampling_ratio, shape)
        rows = grad.float().permute(0, 2, 3, 1).reshape(-1, c)  # (K*PH*PW, C)
        out = torch.sparse.mm(weights, rows)  # (N*H*W, C)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous().to(dtype), None, None, None, None


def _roi_align(features: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int) -> Tensor:
    if features.device.type == "cpu" and sampling_ratio > 0 and torch.is_grad_enabled() and features.requires_grad:
        return _RoIAlignSparseGrad.apply(features, rois, output_size, spatial_scale, sampling_ratio)
    return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)


class SparseGradRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same parameters, state and outputs) whose CPU backward is the sparse
    product above while `sparse_grad` is true; with it false (the default) it is torchvision's module."""

    sparse_grad: bool = False

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if not self.sparse_grad:
            return super().forward(x, boxes, image_shapes)
        levels_in = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                levels_in, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        if len(levels_in) == 1:
            return _roi_align(levels_in[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        # torchvision's _multiscale_roi_align, level by level, with the roi_align above
        levels = self.map_levels(boxes)
        first = levels_in[0]
        result = torch.zeros((len(rois), first.shape[1], *self.output_size), dtype=first.dtype, device=first.device)
        for level, (features, scale) in enumerate(zip(levels_in, self.scales, strict=True)):
            in_level = torch.where(levels == level)[0]
            pooled = _roi_align(features, rois[in_level], self.output_size, scale, self.sampling_ratio)
            result[in_level] = pooled.to(result.dtype)
        return result
