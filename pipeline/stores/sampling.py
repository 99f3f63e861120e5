"""The `sample` step over a whole split: per image, paste the proposals' masks once, find the mask relations
and cut the three crops (all of an image's proposals at once, on the run device); pool every crop with the
frozen backbone in batches that span images. Images can be decoded ahead in DataLoader workers (pinned on
CUDA) and the backbone run under autocast (`pipeline.models.inference`).

Pair indices come back global (rows of the proposals store), so `pairs/object` and `pairs/hier` index the
feature arrays directly. Images are independent, so a split can be processed as disjoint image ranges
(`start`, `stop`) whose outputs concatenate (the shard layout DESIGN.md asks for): `sample_parts` runs
a split part by part (`pipeline.stores.parts`), reading one part's boxes and masks from the proposals store at a
time and saving each part's features (in `dtype`) and pairs as soon as they are done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.geometry.paste import paste_masks_reference, paste_masks_tensor
from pipeline.geometry.relations import relations
from pipeline.models.features import crop_views, pool_features
from pipeline.models.inference import autocast, chunks, part_batches, prefetch, prefetch_groups
from pipeline.stores.parts import Column, ImageParts

VIEWS = ("box", "fg", "bg")
_IMAGES_PER_READ = 8  # images per prefetched batch (workers read `PREFETCH_FACTOR` of these ahead each)


@dataclass
class SplitSamples:
    """Pooled features of the three views of every proposal, and the two kinds of pairs (global indices)."""

    features: dict[str, np.ndarray]  # view -> (N, D) float32
    object_pairs: np.ndarray  # (P, 2) int64, i < j
    hier_pairs: np.ndarray  # (Q, 2) int64, (parent, child)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            **{f"features/{view}": self.features[view] for view in VIEWS},
            "pairs/object": self.object_pairs,
            "pairs/hier": self.hier_pairs,
        }


class _BatchedPool:
    """Accumulates (n, 3, S, S) views across images and pools them `batch_size` at a time."""

    def __init__(self, backbone: nn.Module, batch_size: int, device: str, dim: int, amp: str = "off") -> None:
        self.backbone, self.batch_size, self.device, self.dim = backbone, max(1, batch_size), device, dim
        self.amp = amp
        self.pending: list[torch.Tensor] = []
        self.n_pending = 0
        self.out: list[np.ndarray] = []

    def add(self, views: torch.Tensor) -> None:
        self.pending.append(views)
        self.n_pending += len(views)
        if self.n_pending >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            views = torch.cat(self.pending)
            self.out.append(pool_features(self.backbone, views, self.batch_size, self.device, amp=self.amp))
            self.pending, self.n_pending = [], 0

    def result(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.out) if self.out else np.zeros((0, self.dim), np.float32)


def _with_proposals(image_offsets: np.ndarray, start: int, stop: int) -> list[int]:
    """The images of ``[start, stop)`` with a proposal (the others are not read)."""
    counts = np.diff(np.asarray(image_offsets[start : stop + 1]))
    return (start + np.flatnonzero(counts > 0)).tolist()


def _reader(load_image: Callable[[int], np.ndarray]) -> Callable[[int], tuple[int, np.ndarray]]:
    def read(i: int) -> tuple[int, np.ndarray]:
        return i, load_image(i)

    return read


def sample_split(
    load_image: Callable[[int], np.ndarray] | None,
    image_hw: np.ndarray,
    image_offsets: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    backbone: nn.Module,
    *,
    crop_size: int,
    object_iou: float,
    hier_containment: float,
    relation_max_side: int | None,
    batch_size: int,
    device: str = "cpu",
    progress: bool = True,
    hier_exclude_objects: bool = False,
    num_workers: int = 0,
    amp: str = "off",
    vectorised: bool = True,
    batches: Iterable[list] | None = None,
) -> SplitSamples:
    """Features and pairs of every proposal of a split.

    `load_image(i)` returns image i (row i of the store) as uint8 (H, W, 3); `boxes`, `masks` are the
    proposals store's flat arrays (masks: the mask head's M x M maps). Images without proposals are
    not read. Views of consecutive proposals are pooled `batch_size` at a time (box, fg and bg
    views interleaved per image and separated again at the end). With `hier_exclude_objects`, an object
    pair (IoU above `object_iou`: two proposals of one instance) is never a (parent, child) pair.

    On `device`, per image: the masks are pasted (`pipeline.geometry.paste.paste_masks_tensor`, the same bits
    as torchvision's paste on the CPU: all at once on a GPU, each inside its box on the CPU), their relations
    counted by one product, the three crops of every proposal cut (`pipeline.models.features.crop_views`: all
    at once on a GPU). `num_workers` > 0 decodes the images in DataLoader workers ahead of use (pinned on
    CUDA); `amp` (off | bf16 | fp16) runs the backbone under autocast. ``vectorised=False`` pastes by
    torchvision's whole-image loop and cuts proposal by proposal on every device (the benchmark's baseline).
    `batches`: the images with proposals already being read, in order, as lists of ``(i, pixels)``
    (`sample_parts`' stream); `load_image` (then None) and `num_workers` are then unused.
    """
    dim = int(getattr(backbone, "dim", 0))
    pools = {view: _BatchedPool(backbone, batch_size, device, dim, amp) for view in VIEWS}
    autocast(device, amp)  # an unsupported amp fails here, before any work
    obj_parts, hier_parts = [], []
    n_images = len(image_offsets) - 1
    if batches is None:
        if load_image is None:
            raise ValueError("sample_split: load_image or batches is needed")
        todo = _with_proposals(image_offsets, 0, n_images)
        pin = torch.device(device).type == "cuda"
        batches = prefetch(
            todo, _reader(load_image), batch_size=_IMAGES_PER_READ, num_workers=num_workers, pin_memory=pin
        )
    bar = tqdm(total=int(image_offsets[-1]), desc="sample", unit="proposal", disable=not progress, dynamic_ncols=True)
    for batch in batches:
        for i, pixels in batch:
            start, stop = int(image_offsets[i]), int(image_offsets[i + 1])
            hw = (int(image_hw[i][0]), int(image_hw[i][1]))
            image_boxes = torch.from_numpy(np.ascontiguousarray(boxes[start:stop])).to(device, non_blocking=True)
            image_masks = torch.from_numpy(np.ascontiguousarray(masks[start:stop])).to(device, non_blocking=True)
            if vectorised:  # batched on a GPU, box by box on the CPU (each the faster there)
                full = paste_masks_tensor(image_masks, image_boxes, hw, device=device)
            else:
                full = paste_masks_reference(image_masks, image_boxes, hw).to(device)
            obj, hier = relations(
                full,
                object_iou=object_iou,
                hier_containment=hier_containment,
                max_side=relation_max_side,
                exclusive=hier_exclude_objects,
            )
            obj_parts.append(obj + start)
            hier_parts.append(hier + start)
            views = crop_views(
                pixels, image_boxes, full, crop_size, device=device, batched=None if vectorised else False
            )
            for view, tensor in zip(VIEWS, views, strict=True):
                pools[view].add(tensor)
            bar.update(stop - start)
    bar.close()
    features = {view: pool.result() for view, pool in pools.items()}
    empty = np.zeros((0, 2), np.int64)
    return SplitSamples(
        features=features,
        object_pairs=np.concatenate(obj_parts).astype(np.int64) if obj_parts else empty,
        hier_pairs=np.concatenate(hier_parts).astype(np.int64) if hier_parts else empty,
    )


def sample_columns(dim: int, dtype: str) -> dict[str, Column]:
    """The arrays of a samples store (besides image_offsets), as `ImageParts` columns."""
    return {
        **{f"features/{view}": Column(dtype, (dim,)) for view in VIEWS},
        "pairs/object": Column("int64", (2,)),
        "pairs/hier": Column("int64", (2,)),
    }


PAIR_COLUMNS = ("pairs/object", "pairs/hier")


def sample_parts(
    parts: ImageParts,
    proposals,
    load_image: Callable[[int], np.ndarray],
    backbone: nn.Module,
    *,
    dtype: str,
    crop_size: int,
    object_iou: float,
    hier_containment: float,
    relation_max_side: int | None,
    batch_size: int,
    device: str = "cpu",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    hier_exclude_objects: bool = False,
    num_workers: int = 0,
    amp: str = "off",
) -> None:
    """`sample_split` over every part of `parts` not yet on disk (this rank's share), one part in memory.

    `proposals` is the proposals store (a zarr group: image_offsets, image_hw, boxes, masks);
    `load_image(i)` returns image i of the store. Pairs are saved part-local; `ImageParts.assemble`
    makes them rows of the whole store. `num_workers` and `amp` as in `sample_split`.
    """
    offsets = np.asarray(proposals["image_offsets"][...])
    image_hw = np.asarray(proposals["image_hw"][...])
    todo = parts.pending(rank, world_size)
    total = sum(int(offsets[stop] - offsets[start]) for start, stop in todo)
    # one set of decoding workers for all the parts, in the groups `sample_split` makes within each part
    groups = [chunks(_with_proposals(offsets, start, stop), _IMAGES_PER_READ) for start, stop in todo]
    pin = torch.device(device).type == "cuda"
    stream = prefetch_groups(
        [g for part in groups for g in part], _reader(load_image), num_workers=num_workers, pin_memory=pin
    )
    bar = tqdm(total=total, desc="sample", unit="proposal", disable=not progress, dynamic_ncols=True)
    with contextlib.closing(stream):  # the workers stop when the parts are done or one fails
        for (start, stop), part in zip(todo, groups, strict=True):
            lo, hi = int(offsets[start]), int(offsets[stop])
            result = sample_split(
                None,  # the part's images come from the stream
                image_hw[start:stop],
                offsets[start : stop + 1] - lo,
                np.asarray(proposals["boxes"][lo:hi]),
                np.asarray(proposals["masks"][lo:hi]),
                backbone,
                crop_size=crop_size,
                object_iou=object_iou,
                hier_containment=hier_containment,
                relation_max_side=relation_max_side,
                batch_size=batch_size,
                device=device,
                progress=False,
                hier_exclude_objects=hier_exclude_objects,
                amp=amp,
                batches=part_batches(stream, len(part), start),
            )
            arrays = {f"features/{view}": result.features[view].astype(dtype) for view in VIEWS}
            arrays.update({"pairs/object": result.object_pairs, "pairs/hier": result.hier_pairs})
            parts.write(start, stop, np.diff(offsets[start : stop + 1]), arrays)
            bar.update(hi - lo)
    bar.close()
