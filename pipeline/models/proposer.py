"""Class-agnostic mask proposals: a torchvision Mask R-CNN, built, saved, loaded and run here.

The proposer is Mask R-CNN with an FPN backbone (ResNet-18/50 or MobileNetV3-Large), randomly
initialised (nothing is ever downloaded) and trained on the base categories only, with every
category merged into one "object" class (num_classes=2: object vs background).

Choices worth knowing:
- images are resized so that their longer side equals `image_size` (min_size = max_size); boxes come
  back in the original image's pixels;
- anchors: one size per FPN level, 4 x the level's stride for images of 128 px (16, 32, ..., 256),
  scaled with `image_size` but never larger than torchvision's COCO anchors (32, ..., 512);
- RPN and box-head budgets are torchvision's for images of 512 px or more, and smaller below (a 128 px
  image with a handful of objects needs neither 2000 RPN proposals nor 512 sampled RoIs, and the box
  head's cost on the CPU is proportional to them);
- `light_heads` (the default below 512 px): a box head of 512 features instead of 1024 and a mask head
  of two 128-channel convolutions instead of four of 256, which cuts a CPU training step at 128 px by
  about 2x (the RoI heads, not the backbone, dominate it there); torchvision's own layout otherwise, and
  always for a torchvision state dict;
- inference is class-agnostic whatever the number of classes: per RoI the best foreground class gives
  the score, the box and the mask, then one NMS over all classes (the paper's protocol: score >= 0.5,
  NMS 0.6, at most 20 detections);
- training (`pipeline.models.proposer_train`): SGD with warm-up and cosine decay, flips and colour-channel
  permutations, resumable from checkpoints, one process or DistributedDataParallel ranks;
- `propose` returns the mask head's own 28 x 28 box-relative probabilities (uint8, round(255 p)),
  not pasted masks; `pipeline.geometry.paste.paste_masks` turns them into full-resolution masks.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipeline.device import pick_device
from pipeline.errors import PipelineError
from pipeline.models.cpu_paths import ChannelsLastMaxPool2d, ThreadedRPN
from pipeline.models.inference import autocast
from pipeline.models.roi_align import SparseGradRoIAlign
from pipeline.stores.store import torch_bytes, write_bytes

BACKBONES = ("resnet18", "resnet50", "mobilenet_v3")
LIGHT_BOX_FEATURES = 512  # box-head width of the light heads (torchvision: 1024)
LIGHT_MASK_LAYERS = (128, 128)  # mask-head convolutions of the light heads (torchvision: 4 x 256)
MASK_SIZE = 28  # the mask head's native output resolution (14 x 14 RoIAlign, upsampled x2)
FPN_CHANNELS = 256  # torchvision's FPN width (build_model's fpn_channels default)
_COCO_ANCHORS = ((32,), (64,), (128,), (256,), (512,))  # torchvision's maskrcnn_resnet50_fpn anchors
_MOBILENET_LEVELS = [2, 3, 4]  # strides 8, 16, 32 (+ max-pool level at 64): small objects need stride 8
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# model


class _ClassAgnosticRoIHeads(RoIHeads):
    """RoIHeads whose inference merges classes: best foreground class per RoI, one NMS over all.

    With num_classes=2 this is exactly torchvision's post-processing; with more classes (a COCO-trained
    checkpoint) each RoI yields at most one detection, whose mask is the winning class's mask.
    """

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        boxes_per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)  # (N, C, 4)
        pred_scores = F.softmax(class_logits, -1)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(
            pred_boxes.split(boxes_per_image, 0), pred_scores.split(boxes_per_image, 0), image_shapes, strict=False
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            best_scores, best = scores[:, 1:].max(dim=1)
            labels = best + 1
            boxes = boxes[torch.arange(len(boxes), device=boxes.device), labels]
            keep = torch.where(best_scores > self.score_thresh)[0]
            boxes, scores_kept, labels = boxes[keep], best_scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores_kept, labels = boxes[keep], scores_kept[keep], labels[keep]
            keep = box_ops.nms(boxes, scores_kept, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores_kept[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


def _anchor_base(image_size: int) -> int:
    """Anchor size at stride 4: 16 px for 128 px images, proportional to image_size, at most 32 (COCO)."""
    return int(min(32, max(4, round(16 * image_size / 128))))


def _resnet_fpn(trunk: nn.Module, trainable_layers: int, out_channels: int) -> BackboneWithFPN:
    """torchvision's `_resnet_fpn_extractor` (layers 1-4, max-pool level) with `out_channels` FPN channels
    instead of its fixed 256."""
    if out_channels == FPN_CHANNELS:
        return _resnet_fpn_extractor(trunk, trainable_layers)  # torchvision's own: the same modules, the same draws
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in trunk.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    stage2 = trunk.inplanes // 8
    return BackboneWithFPN(
        trunk,
        {f"layer{k}": str(v) for v, k in enumerate([1, 2, 3, 4])},
        [stage2 * 2 ** (i - 1) for i in [1, 2, 3, 4]],
        out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _backbone(
    backbone: str, trainable_layers: int, norm_layer, fpn_channels: int = 256
) -> tuple[nn.Module, tuple[tuple[int, ...], ...]]:
    """FPN backbone and the strides (relative to 4) of its feature levels, in order."""
    if backbone in ("resnet18", "resnet50"):
        trunk = (resnet18 if backbone == "resnet18" else resnet50)(weights=None, norm_layer=norm_layer)
        return _resnet_fpn(trunk, min(trainable_layers, 5), fpn_channels), (1, 2, 4, 8, 16)
    if fpn_channels != FPN_CHANNELS:
        raise PipelineError(f"proposer fpn_channels other than {FPN_CHANNELS} need a resnet backbone, not {backbone}")
    if backbone == "mobilenet_v3":
        trunk = mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        n_stages = 6  # conv1 + 4 strided blocks + last layer
        fpn = _mobilenet_extractor(trunk, True, min(trainable_layers, n_stages), _MOBILENET_LEVELS)
        return fpn, (2, 4, 8, 16)
    raise PipelineError(f"unknown proposer backbone {backbone!r} (expected one of {', '.join(BACKBONES)})")


def build_model(
    backbone: str = "resnet18",
    image_size: int = 128,
    *,
    num_classes: int = 2,
    score_thresh: float = 0.5,
    nms_thresh: float = 0.6,
    max_proposals: int = 20,
    trainable_layers: int = 5,
    rpn_nms_thresh: float = 0.7,
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None,
    frozen_batchnorm: bool = False,
    light_heads: bool | None = None,
    fpn_channels: int = 256,
) -> MaskRCNN:
    """A randomly initialised, class-agnostic Mask R-CNN for images resized to `image_size` (longer side).

    `score_thresh`, `nms_thresh` and `max_proposals` are the final detections' (paper: 0.5, 0.6, 20);
    `rpn_nms_thresh` is the RPN's. Batch norm is trainable (torchvision's choice without pretrained
    weights) unless `frozen_batchnorm` (the layout of torchvision's COCO-trained checkpoints).
    `anchor_sizes`: one tuple per FPN level; default from `image_size` (see the module docstring).
    `fpn_channels`: the width of the FPN and so of every head's input (torchvision: 256; resnets only).
    """
    if image_size < 64:
        raise PipelineError(f"proposer image_size must be at least 64 pixels, got {image_size}")
    if num_classes < 2:
        raise PipelineError(f"num_classes must be at least 2 (background + object), got {num_classes}")
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
    if fpn_channels < 1:
        raise PipelineError(f"proposer fpn_channels must be at least 1, got {fpn_channels}")
    body, level_strides = _backbone(backbone, trainable_layers, norm_layer, fpn_channels)
    if anchor_sizes is None:
        base = _anchor_base(image_size)
        anchor_sizes = tuple((base * s,) for s in level_strides)
    if len(anchor_sizes) != len(level_strides):
        raise PipelineError(f"{backbone} has {len(level_strides)} FPN levels, got {len(anchor_sizes)} anchor sizes")
    anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    small = image_size < 512
    light = small if light_heads is None else light_heads
    heads = {}
    if light:
        heads = {
            "box_head": TwoMLPHead(body.out_channels * 7 * 7, LIGHT_BOX_FEATURES),
            "box_predictor": FastRCNNPredictor(LIGHT_BOX_FEATURES, num_classes),
            "mask_head": MaskRCNNHeads(body.out_channels, LIGHT_MASK_LAYERS, 1),
            "mask_predictor": MaskRCNNPredictor(LIGHT_MASK_LAYERS[-1], LIGHT_MASK_LAYERS[-1], num_classes),
        }
    model = MaskRCNN(
        body,
        num_classes=None if light else num_classes,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000 if small else 2000,
        rpn_post_nms_top_n_train=1000 if small else 2000,
        rpn_pre_nms_top_n_test=500 if small else 1000,
        rpn_post_nms_top_n_test=300 if small else 1000,
        rpn_nms_thresh=rpn_nms_thresh,
        rpn_batch_size_per_image=256,
        box_batch_size_per_image=64 if small else 512,
        box_score_thresh=score_thresh,
        box_nms_thresh=nms_thresh,
        box_detections_per_img=max_proposals,
        **heads,
    )
    model.light_heads = light
    model.roi_heads.__class__ = _ClassAgnosticRoIHeads
    model.rpn.__class__ = ThreadedRPN  # the per-image NMS on threads on the CPU (cpu_paths: the same boxes)
    stem_pool = getattr(model.backbone.body, "maxpool", None)  # resnets
    if type(stem_pool) is nn.MaxPool2d:
        stem_pool.__class__ = ChannelsLastMaxPool2d  # without gradients: channels-last on the CPU, the same values
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        pool.__class__ = SparseGradRoIAlign  # torchvision's module until training turns on its sparse backward
    return model


def _num_classes(model: MaskRCNN) -> int:
    return int(model.roi_heads.box_predictor.cls_score.out_features)


# --------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(model: MaskRCNN, path: Path, backbone: str, image_size: int) -> None:
    """Write {state_dict, backbone, image_size, num_classes, light_heads, and fpn_channels when not 256}
    atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone": backbone,
        "image_size": int(image_size),
        "num_classes": _num_classes(model),
        "light_heads": bool(getattr(model, "light_heads", False)),
    }
    if model.backbone.out_channels != FPN_CHANNELS:  # recorded only when not torchvision's (older files lack it)
        payload["fpn_channels"] = int(model.backbone.out_channels)
    write_bytes(path, torch_bytes(payload))


def _key_mismatch(path: Path, missing: list[str], unexpected: list[str], hint: str) -> PipelineError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    return PipelineError(f"{path}: incompatible Mask R-CNN weights: {', '.join(parts)}{hint}")


def _load_state(model: MaskRCNN, state: dict, path: Path, hint: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise _key_mismatch(path, missing, unexpected, hint)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PipelineError(
                f"{path}: incompatible Mask R-CNN weights: {key} has shape {got}, the model expects "
                f"{tuple(own[key].shape)}{hint}"
            )
    model.load_state_dict(state)


def load_checkpoint(path: Path, backbone: str | None = None, image_size: int | None = None, **infer_kw) -> MaskRCNN:
    """A Mask R-CNN in eval mode from `path`, which holds either our own checkpoint (`save_checkpoint`)
    or a plain torchvision state dict (e.g. COCO-trained `maskrcnn_resnet50_fpn`, 91 classes: then
    frozen batch norm and COCO anchors, inference class-agnostic). `infer_kw`: score_thresh,
    nms_thresh, max_proposals (and other `build_model` keywords).

    `backbone` and `image_size` are checked against our own checkpoint (None: take its own) and are
    required for a plain state dict, which does not record them.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: proposer checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip/torch errors all mean "not a torch checkpoint"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"{path}: not a readable torch checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict):
        raise PipelineError(f"{path}: not a Mask R-CNN checkpoint (holds a {type(payload).__name__}, not a dict)")
    if "state_dict" in payload:  # our own format
        for key in ("backbone", "image_size", "num_classes"):
            if key not in payload:
                raise PipelineError(f"{path}: proposer checkpoint lacks {key!r}")
        backbone = payload["backbone"] if backbone is None else backbone
        image_size = int(payload["image_size"]) if image_size is None else image_size
        if payload["backbone"] != backbone:
            raise PipelineError(
                f"{path}: checkpoint was trained with backbone {payload['backbone']!r}, the params ask for {backbone!r}"
            )
        if int(payload["image_size"]) != int(image_size):
            raise PipelineError(
                f"{path}: checkpoint was trained at image_size {payload['image_size']}, the params ask for {image_size}"
            )
        light = bool(payload.get("light_heads", False))
        model = build_model(
            backbone,
            image_size,
            num_classes=int(payload["num_classes"]),
            light_heads=light,
            fpn_channels=int(payload.get("fpn_channels", FPN_CHANNELS)),
            **infer_kw,
        )
        if not isinstance(payload["state_dict"], dict):
            raise PipelineError(f"{path}: proposer checkpoint's state_dict is not a dict")
        _load_state(model, payload["state_dict"], path, "")
    else:  # a plain torchvision state dict
        weight = payload.get("roi_heads.box_predictor.cls_score.weight")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            some = next(iter(payload), None)
            raise PipelineError(
                f"{path}: not a Mask R-CNN state dict (no roi_heads.box_predictor.cls_score.weight; first key {some!r})"
            )
        if backbone is None or image_size is None:
            raise PipelineError(f"{path}: a plain state dict needs proposer.backbone and proposer.image_size")
        # torchvision's released weights use frozen batch norm (no num_batches_tracked) and COCO anchors
        frozen = not any(str(k).endswith("num_batches_tracked") for k in payload)
        kw = {"anchor_sizes": _COCO_ANCHORS if backbone != "mobilenet_v3" else None, **infer_kw}
        kw["light_heads"] = False
        model = build_model(backbone, image_size, num_classes=int(weight.shape[0]), frozen_batchnorm=frozen, **kw)
        _load_state(
            model, payload, path, f" (a torchvision state dict must match maskrcnn_{backbone}_fpn; backbone={backbone})"
        )
    return model.eval()


# --------------------------------------------------------------------------------------------------
# inference


def _empty(mask_size: int) -> dict:
    return {
        "boxes": np.zeros((0, 4), dtype=np.float32),
        "scores": np.zeros((0,), dtype=np.float32),
        "masks": np.zeros((0, mask_size, mask_size), dtype=np.uint8),
        "labels": np.zeros((0,), dtype=np.int64),
    }


def _is_image(img) -> bool:
    if isinstance(img, np.ndarray):
        return img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    if isinstance(img, torch.Tensor):
        return img.dtype == torch.uint8 and img.ndim == 3 and img.shape[2] == 3
    return False


def propose(
    model: MaskRCNN,
    images: list[np.ndarray | torch.Tensor],
    *,
    device: str,
    batch_size: int | None = None,
    amp: str = "off",
) -> list[dict]:
    """Run the proposer on uint8 (H, W, 3) images, `batch_size` at a time (all at once by default).

    Images are numpy arrays or uint8 CPU tensors (pinned ones, from `pipeline.models.inference.prefetch`, are
    copied to the device without blocking). `amp` (off | bf16 | fp16) runs the network under autocast;
    the outputs are float32 whatever it is.
    Per image: `boxes` (n, 4) float32 xyxy in the image's pixels, `scores` (n,) float32, descending,
    `masks` (n, 28, 28) uint8 = round(255 * p), the mask head's box-relative output (not pasted),
    `labels` (n,) int64, the winning class (always 1 for a class-agnostic proposer).
    The model is left in eval mode on `device`.
    """
    device = pick_device(device)
    for i, img in enumerate(images):
        if not _is_image(img):
            desc = (
                f"{img.dtype} {tuple(img.shape)}" if isinstance(img, (np.ndarray, torch.Tensor)) else type(img).__name__
            )
            raise PipelineError(f"propose: image {i} must be a uint8 (H, W, 3) array, got {desc}")
    context = autocast(device, amp)  # checked before any work
    model.to(device).eval()
    step = len(images) if not batch_size else int(batch_size)
    results: list[dict] = []
    with torch.inference_mode():
        for start in range(0, len(images), max(1, step)):
            results.extend(_propose_batch(model, images[start : start + step], device, context))
    return results


def _propose_batch(
    model: MaskRCNN, images: list[np.ndarray | torch.Tensor], device: str, context=contextlib.nullcontext()
) -> list[dict]:
    tensors = [
        (img if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img)))
        .to(device, non_blocking=True)
        .permute(2, 0, 1)
        .float()
        .div_(255.0)
        for img in images
    ]
    original_sizes = [(int(img.shape[0]), int(img.shape[1])) for img in images]
    with context:
        image_list, _ = model.transform(tensors)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    out = []
    for det, resized, original in zip(detections, image_list.image_sizes, original_sizes, strict=True):
        masks = det["masks"]  # (n, 1, M, M) probabilities of the winning class
        mask_size = int(masks.shape[-1]) if masks.ndim == 4 else MASK_SIZE
        if len(det["boxes"]) == 0:
            out.append(_empty(mask_size))
            continue
        order = torch.argsort(det["scores"], descending=True, stable=True)
        boxes = resize_boxes(det["boxes"][order].float(), resized, original)
        out.append(
            {
                "boxes": boxes.float().cpu().numpy().astype(np.float32),
                "scores": det["scores"][order].float().cpu().numpy().astype(np.float32),
                "masks": torch.round(masks[order, 0].float() * 255.0).clamp_(0, 255).to(torch.uint8).cpu().numpy(),
                "labels": det["labels"][order].cpu().numpy().astype(np.int64),
            }
        )
    return out
