"""COCO-format instances as (image, target) pairs for training torchvision's Mask R-CNN.

Class-agnostic by default (every instance is label 1, "object"); `label_map` makes it class-aware (the
supervised baseline). Images resolve through `pipeline.data.lvis_format.image_path` under the folder
given (COCO: bare file_names under <image_root>/train2017), and `exclude_image_ids` drops images before
any is read (the LVIS val images a COCO-trained proposer must not see). The file is streamed once; the
annotations kept wait in an on-disk index by image (`pipeline.data.annotation_stream.AnnotationIndex`), so
memory does not grow with the file (COCO train2017: 860k annotations, 450 MB of JSON).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch

from pipeline.data.annotation_stream import AnnotationIndex, load_image_records
from pipeline.data.lvis_format import IMAGE_FIELDS, image_path, load_image
from pipeline.errors import PipelineError
from pipeline.geometry.masks import annotation_rle, is_short_polygon


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of a COCO segmentation: polygons, uncompressed or compressed RLE."""
    return mask_utils.decode(annotation_rle(segmentation, height, width)).astype(np.uint8)


class CocoInstances(torch.utils.data.Dataset):
    """Instances of a COCO-format file: (image float CxHxW in [0, 1], target dict), class-agnostic by default.

    target: `boxes` (n, 4) float32 xyxy, `labels` (n,) int64 (all 1, or `label_map[category_id]` for a
    class-aware detector such as the supervised baseline), `masks` (n, H, W) uint8,
    `image_id` int. Crowd annotations, boxes narrower or lower than one pixel (after clipping to the image)
    and polygon annotations without a polygon of three points are dropped (detectron2 drops those whose polygons
    are all short, and keeps an empty list as a box without a mask, which Mask R-CNN cannot train on); with
    `skip_empty`, images left without annotations are dropped.
    Images whose id is in `exclude_image_ids` are left out altogether (the COCO-trained proposer must not
    see the LVIS val images, which come from COCO train2017 too); `n_excluded` counts those of the file.
    """

    def __init__(
        self,
        coco_json: Path,
        image_root: Path,
        *,
        skip_empty: bool = True,
        label_map: dict[int, int] | None = None,
        exclude_image_ids: Iterable[int] = (),
    ):
        self.coco_json = Path(coco_json)
        self.label_map = label_map
        self.image_root = Path(image_root)
        what = "COCO annotation file"
        excluded = {int(i) for i in exclude_image_ids}
        try:
            images = {int(img["id"]): img for img in load_image_records(self.coco_json, what, IMAGE_FIELDS)}
            self.n_excluded = len(excluded & images.keys())
            images = {i: img for i, img in images.items() if i not in excluded}

            def instance(ann: dict) -> dict | None:
                img = images.get(int(ann["image_id"]))
                if img is None or ann.get("iscrowd", 0):
                    return None
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, y1 = max(0.0, x), max(0.0, y)
                x2, y2 = min(float(img["width"]), x + w), min(float(img["height"]), y + h)
                if x2 - x1 < 1.0 or y2 - y1 < 1.0:
                    return None
                segmentation = ann["segmentation"]
                if isinstance(segmentation, list) and all(is_short_polygon(p) for p in segmentation):
                    return None  # no polygon of three points to make a mask of
                label = 1 if label_map is None else label_map[int(ann["category_id"])]
                return {"box": (x1, y1, x2, y2), "segmentation": segmentation, "label": label}

            # the annotations wait on disk, indexed by image: 24 bytes each in memory, not their polygons
            self._anns = AnnotationIndex(self.coco_json, what, instance)
        except (KeyError, TypeError, ValueError) as err:
            raise PipelineError(f"{self.coco_json}: not a COCO instances file (bad or missing field {err})") from None
        ids = sorted(images)
        if skip_empty:
            annotated = set(self._anns.image_ids().tolist())
            ids = [i for i in ids if i in annotated]
        self.image_ids = ids
        self._images = images

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.image_ids[index]
        info = self._images[image_id]
        height, width = int(info["height"]), int(info["width"])
        path = image_path(info, self.image_root)
        pixels = load_image(path)
        if pixels.shape[:2] != (height, width):
            raise PipelineError(
                f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} but {self.coco_json} says {width}x{height}"
            )
        anns = self._anns[image_id]
        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        for j, ann in enumerate(anns):
            masks[j] = _decode_segmentation(ann["segmentation"], height, width)
        target = {
            "boxes": torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": image_id,
        }
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)
        return image, target


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def _hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}
