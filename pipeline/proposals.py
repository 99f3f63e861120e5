"""Run the proposer over a split and assemble the proposals store (DESIGN.md's contract)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.data.lvis_format import image_path, load_image
from pipeline.errors import PipelineError
from pipeline.store import offsets_from_counts

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


def propose_split(
    images: list[dict],
    image_root: Path,
    infer: Callable[[list[np.ndarray]], list[dict]],
    *,
    batch_size: int,
    mask_size: int,
    on_missing_image: str = "error",
    progress: bool = True,
) -> SplitProposals:
    """Run `infer` (a batch of RGB uint8 images -> per-image dicts of boxes, scores, masks) over `images`.

    Images keep their order; one that yields no proposal keeps a zero-length row range. A missing or
    unreadable image raises (naming the file) or, with on_missing_image='skip', gets zero rows and is counted.
    """
    results: list[dict | None] = [None] * len(images)
    hw = np.zeros((len(images), 2), dtype=np.int64)
    skipped: list[int] = []
    bar = tqdm(total=len(images), desc="propose", unit="img", disable=not progress)
    for start in range(0, len(images), batch_size):
        batch_idx, batch_img = [], []
        for i in range(start, min(start + batch_size, len(images))):
            record = images[i]
            hw[i] = (record["height"], record["width"])
            try:
                pixels = load_image(image_path(record, image_root))
            except PipelineError:
                if on_missing_image != "skip":
                    raise
                skipped.append(int(record["id"]))
                continue
            if pixels.shape[:2] != (record["height"], record["width"]):
                raise PipelineError(
                    f"{image_path(record, image_root)}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                    f"annotations say {record['width']}x{record['height']}"
                )
            batch_idx.append(i)
            batch_img.append(pixels)
        if batch_img:
            for i, out in zip(batch_idx, infer(batch_img), strict=True):
                results[i] = out
        bar.update(min(batch_size, len(images) - start))
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
