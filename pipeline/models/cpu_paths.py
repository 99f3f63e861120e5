"""Exact CPU speed-ups of two torchvision pieces the proposer and the feature backbone run in one thread.

- `ThreadedRPN`: torchvision's RegionProposalNetwork whose per-image filtering (clip, small and low-scoring boxes
  out, NMS per FPN level, the top post-NMS boxes) runs the images on torch's intra-op thread count of Python
  threads on the CPU. torchvision's NMS kernel is single-threaded and the filtering loops over the images one
  by one: at the default 2 threads it was 31 ms of a 385 ms training step, 19 ms on threads. Every image is
  filtered by the same operations as torchvision's loop, alone, so the boxes are the same bit for bit.
- `ChannelsLastMaxPool2d`: ResNet's stem max-pool (3x3, stride 2) computed on a channels-last copy of its input
  on the CPU when no gradient is needed. torch's CPU kernel for the default (NCHW) layout is scalar; its
  channels-last kernel runs across channels in vector registers: 128 views of 64 x 64 px took 38 ms in the
  NCHW kernel, 11 ms with both copies (sample's backbone, 2 threads). A maximum is exact: the same values, the
  output back in the input's layout.

Neither runs on a GPU (its kernels are parallel already) or under CPU autocast (thread-local state that a
worker thread would not share), where torchvision's own code runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

T = TypeVar("T")
R = TypeVar("R")
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (its threads, the pool)


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child (a DataLoader worker) has none of its parent's threads


os.register_at_fork(after_in_child=_forget_pool)


def map_on_threads(fn: Callable[[T], R], items: Iterable[T], device: torch.device) -> list[R]:
    """``[fn(item) for item in items]``, on ``torch.get_num_threads()`` Python threads when ``device`` is the CPU,
    that count is above one and CPU autocast is off (in order either way)."""
    items = list(items)
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(items) < 2 or torch.is_autocast_enabled("cpu"):
        return [fn(item) for item in items]
    global _POOL
    if _POOL is None or _POOL[0] != threads:  # first use, or torch's thread count changed since
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="cpu_paths"))
    return list(_POOL[1].map(fn, items))


class ThreadedRPN(RegionProposalNetwork):
    """torchvision's RegionProposalNetwork (same parameters, state and outputs) whose `filter_proposals` runs its
    per-image loop through `map_on_threads`."""

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        # torchvision 0.29's RegionProposalNetwork.filter_proposals, its loop over the images on threads
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)  # do not backprop through objectness
        levels = [
            torch.full((n,), idx, dtype=torch.int64, device=device) for idx, n in enumerate(num_anchors_per_level)
        ]
        levels = torch.cat(levels, 0).reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, before NMS
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        objectness_prob = torch.sigmoid(objectness)

        def one_image(image: tuple[Tensor, Tensor, Tensor, tuple[int, int]]) -> tuple[Tensor, Tensor]:
            boxes, scores, lvl, img_shape = image
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]  # >= as torchvision
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)  # NMS per level
            keep = keep[: self.post_nms_top_n()]
            return boxes[keep], scores[keep]

        kept = map_on_threads(one_image, zip(proposals, objectness_prob, levels, image_shapes, strict=True), device)
        return [boxes for boxes, _ in kept], [scores for _, scores in kept]


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d (same parameters and outputs) that pools a channels-last copy of a 4-d CPU input when no
    gradient flows through it, and returns the result in the input's layout."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.return_indices
            or (torch.is_grad_enabled() and x.requires_grad)
            or x.is_contiguous(memory_format=torch.channels_last)
        ):
            return super().forward(x)
        pooled = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
        )
        return pooled.contiguous()
