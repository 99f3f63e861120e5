"""Run the proposer over a split and assemble the proposals store (DESIGN.md's contract).

`propose_parts` runs a split part by part (`pipeline.stores.parts`): each part of whole images is saved as
soon as it is done, a rerun after a kill goes on from the first missing part, and memory holds one part (and,
with decoding workers, the next part's first batches being read ahead). `StoreProposals` reads a finished store
back image by image, a block of images at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.lvis_format import image_path, load_image
from pipeline.errors import PipelineError
from pipeline.models.inference import chunks, part_batches, prefetch, prefetch_groups
from pipeline.stores.parts import Column, ImageParts
from pipeline.stores.store import offsets_from_counts

log = logging.getLogger(__name__)


@dataclass
class SplitProposals:
    """Proposals of every image of a split, ragged by image (flat rows + image_offsets)."""

    image_ids: np.ndarray
    image_hw: np.ndarray
    image_offsets: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    skipped: list[int] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "image_ids": self.image_ids,
            "image_hw": self.image_hw,
            "image_offsets": self.image_offsets,
            "boxes": self.boxes,
            "scores": self.scores,
            "masks": self.masks,
        }

    def per_image(self) -> list[dict]:
        out = []
        for i in range(len(self.image_ids)):
            rows = slice(int(self.image_offsets[i]), int(self.image_offsets[i + 1]))
            out.append({"boxes": self.boxes[rows], "scores": self.scores[rows], "masks": self.masks[rows]})
        return out


def image_reader(
    images: list[dict], image_root: Path, on_missing_image: str = "error"
) -> Callable[[int], tuple[int, np.ndarray | None]]:
    """``read(i) -> (i, pixels)`` of ``images[i]``: uint8 (H, W, 3), checked against the record's size; a missing
    or unreadable image raises (naming the file) or, with on_missing_image='skip', reads as None."""

    def read(i: int) -> tuple[int, np.ndarray | None]:
        record = images[i]
        try:
            pixels = load_image(image_path(record, image_root))
        except PipelineError:
            if on_missing_image != "skip":
                raise
            return i, None
        if pixels.shape[:2] != (record["height"], record["width"]):
            raise PipelineError(
                f"{image_path(record, image_root)}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"annotations say {record['width']}x{record['height']}"
            )
        return i, pixels

    return read


def propose_split(
    images: list[dict],
    image_root: Path,
    infer: Callable[[list[np.ndarray | torch.Tensor]], list[dict]],
    *,
    batch_size: int,
    mask_size: int,
    on_missing_image: str = "error",
    progress: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    batches: Iterable[list] | None = None,
) -> SplitProposals:
    """Run `infer` (a batch of RGB uint8 images -> per-image dicts of boxes, scores, masks) over `images`.

    Images keep their order; one that yields no proposal keeps a zero-length row range. A missing or
    unreadable image raises (naming the file) or, with on_missing_image='skip', gets zero rows and is counted.
    With `num_workers` > 0 the images are decoded in DataLoader workers, a few batches ahead, and reach
    `infer` as uint8 (H, W, 3) tensors (pinned with `pin_memory`, for a CUDA `infer`); without, in this
    process as numpy arrays, one batch when it is needed (`pipeline.models.inference.prefetch`). `batches`:
    those batches already being read, ``(index into images, pixels or None)`` each (`propose_parts`' stream);
    `image_root`, `on_missing_image`, `batch_size`, `num_workers` and `pin_memory` are then the reader's business,
    unused here.
    """
    results: list[dict | None] = [None] * len(images)
    hw = np.array([(r["height"], r["width"]) for r in images], dtype=np.int64).reshape(-1, 2)
    skipped: list[int] = []

    bar = tqdm(total=len(images), desc="propose", unit="img", disable=not progress)
    if batches is None:
        read = image_reader(images, image_root, on_missing_image)
        indices = range(len(images))
        batches = prefetch(indices, read, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    for batch in batches:
        batch_idx = [i for i, pixels in batch if pixels is not None]
        skipped.extend(int(images[i]["id"]) for i, pixels in batch if pixels is None)
        if batch_idx:
            for i, out in zip(batch_idx, infer([pixels for _, pixels in batch if pixels is not None]), strict=True):
                results[i] = out
        bar.update(len(batch))
    bar.close()
    empty = {
        "boxes": np.zeros((0, 4), np.float32),
        "scores": np.zeros((0,), np.float32),
        "masks": np.zeros((0, mask_size, mask_size), np.uint8),
    }
    filled = [r if r is not None else empty for r in results]
    if skipped:
        log.warning("skipped %d missing or unreadable images (first id %d)", len(skipped), skipped[0])
    return SplitProposals(
        image_ids=np.array([int(r["id"]) for r in images], dtype=np.int64),
        image_hw=hw,
        image_offsets=offsets_from_counts([len(r["scores"]) for r in filled]),
        boxes=np.concatenate([r["boxes"] for r in filled]).astype(np.float32) if filled else empty["boxes"],
        scores=np.concatenate([r["scores"] for r in filled]).astype(np.float32) if filled else empty["scores"],
        masks=np.concatenate([r["masks"] for r in filled]).astype(np.uint8) if filled else empty["masks"],
        skipped=skipped,
    )


def proposal_columns(mask_size: int) -> dict[str, Column]:
    """The arrays of a proposals store (besides image_offsets), as `ImageParts` columns."""
    return {
        "image_ids": Column("int64", (), per_image=True),
        "image_hw": Column("int64", (2,), per_image=True),
        "boxes": Column("float32", (4,)),
        "scores": Column("float32", ()),
        "masks": Column("uint8", (mask_size, mask_size)),
    }


def propose_parts(
    parts: ImageParts,
    images: list[dict],
    image_root: Path,
    infer: Callable[[list[np.ndarray]], list[dict]],
    *,
    batch_size: int,
    mask_size: int,
    on_missing_image: str = "error",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> None:
    """Propose for every part of `parts` not yet on disk (this rank's share), saving each when done.

    `num_workers`, `pin_memory`: image decoding ahead in DataLoader workers (see `propose_split`), one set for
    all the parts: a part's batches (`batch_size` images from its first, as `propose_split` makes them) are read
    while the previous part is inferred and written."""
    todo = parts.pending(rank, world_size)
    n_todo = sum(stop - start for start, stop in todo)
    groups = [chunks(range(start, stop), batch_size) for start, stop in todo]  # each part's, as propose_split's
    read = image_reader(images, image_root, on_missing_image)
    stream = prefetch_groups([g for part in groups for g in part], read, num_workers=num_workers, pin_memory=pin_memory)
    bar = tqdm(total=n_todo, desc="propose", unit="img", disable=not progress, dynamic_ncols=True)
    with contextlib.closing(stream):  # the workers stop when the parts are done or one fails
        for (start, stop), part in zip(todo, groups, strict=True):
            result = propose_split(
                images[start:stop],
                image_root,
                infer,
                batch_size=batch_size,
                mask_size=mask_size,
                on_missing_image=on_missing_image,
                progress=False,
                batches=part_batches(stream, len(part), start),
            )
            counts = np.diff(result.image_offsets)
            arrays = {name: value for name, value in result.arrays().items() if name != "image_offsets"}
            parts.write(start, stop, counts, arrays, meta={"skipped": result.skipped})
            bar.update(stop - start)
    bar.close()


class StoreProposals:
    """The proposals of a store image by image (dicts of boxes, scores, masks), read `block` images at a time.

    A sequence for `evaluate_proposals` and friends that never holds more than one block of masks.
    """

    def __init__(self, group, block: int = 256) -> None:
        self.group, self.block = group, max(1, int(block))
        self.offsets = np.asarray(group["image_offsets"][...])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self):
        for first in range(0, len(self), self.block):
            last = min(first + self.block, len(self))
            lo, hi = int(self.offsets[first]), int(self.offsets[last])
            boxes, scores, masks = (np.asarray(self.group[name][lo:hi]) for name in ("boxes", "scores", "masks"))
            for i in range(first, last):
                rows = slice(int(self.offsets[i]) - lo, int(self.offsets[i + 1]) - lo)
                yield {"boxes": boxes[rows], "scores": scores[rows], "masks": masks[rows]}
