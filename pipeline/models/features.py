"""Three crops per proposal (box, foreground, background) and their frozen-backbone pooled features.

Crops. Each proposal's crop is the square centred on its box whose side is the box's longer side (at
least one pixel); it may leave the image, where it is zero (black). The square is resampled to
``crop_size`` x ``crop_size`` with :func:`torchvision.ops.roi_align` (``aligned=True``, adaptive sampling:
bilinear when enlarging, an average of ``ceil(side / crop_size)``² bilinear samples per output pixel when
shrinking). The image is padded with one row/column of zeros before sampling, so that samples outside
the image read true zero padding (roi_align alone would repeat the border pixel for half a pixel).

Masking happens in pixel space at full resolution *before* resampling, as in the authors' released code
(which multiplies the image by the mask, then crops and resizes):

    box = resample(image)        fg = resample(image * mask)        bg = resample(image * (1 - mask))

so masked-out pixels are black (0) and, by linearity of the resampling, ``fg + bg == box`` (``bg`` is
computed as ``box - fg``). The box views of an image are one roi_align over the image; on a GPU the foreground
views are one roi_align over a batch of the masked windows around each square, on the CPU one roi_align per
window, which is faster there (the batch pads every window to the largest; the same bits either way). The
views are float32 RGB in [0, 1]; they are *not* normalised. The ImageNet mean/std normalisation is the first
operation of the backbone returned by :func:`build_backbone`, i.e.
it is applied after masking (a masked-out pixel enters the network as ``-mean / std``, the value of a
black pixel) — the same normalisation torchvision's Mask R-CNN applies to its [0, 1] input, so a
proposer-initialised trunk sees the input statistics it was trained with.

Backbone. :func:`build_backbone` returns a :class:`FrozenBackbone`: normalisation, a torchvision ResNet
trunk (``conv1`` … ``layer4``), global average pooling → a D-vector (512 for resnet18, 2048 for resnet50).
It is in eval mode with ``requires_grad`` False everywhere, and stays in eval mode even when ``.train()``
is called on it or a parent module (BatchNorm statistics never change).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.ops import roi_align

from pipeline.device import use_batched
from pipeline.errors import PipelineError
from pipeline.geometry.paste import paste_masks
from pipeline.models.cpu_paths import ChannelsLastMaxPool2d
from pipeline.models.inference import autocast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_DIMS = {"resnet18": 512, "resnet50": 2048}
_PROPOSER_PREFIX = "backbone.body."

__all__ = [
    "BACKBONE_DIMS",
    "FrozenBackbone",
    "build_backbone",
    "crop_views",
    "extract_image",
    "pool_features",
    "square_crop_boxes",
]


# --------------------------------------------------------------------------------------------- crops


def square_crop_boxes(boxes: np.ndarray | torch.Tensor, min_side: float = 1.0) -> torch.Tensor:
    """(n, 4) xyxy -> (n, 4) float32 xyxy squares centred on each box, side = max(longer side, min_side)."""
    b = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes, dtype=torch.float32)
    b = b.reshape(-1, 4)
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2
    half = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).clamp_min(min_side) / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def _image_tensor(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise PipelineError(f"features: expected an (H, W, 3) image, got shape {tuple(img.shape)}")
    if img.dtype != torch.uint8:
        raise PipelineError(f"features: expected a uint8 image, got {img.dtype}")
    return img.to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0)


def crop_views(
    image: np.ndarray | torch.Tensor,
    boxes: np.ndarray | torch.Tensor,
    full_masks: np.ndarray | torch.Tensor,
    crop_size: int,
    *,
    device: str | torch.device = "cpu",
    batched: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box, foreground and background views, each float32 (n, 3, S, S) in [0, 1] on `device`.

    `image` is uint8 (H, W, 3); `boxes` (n, 4) xyxy in image pixels; `full_masks` (n, H, W) bool. See the
    module docstring for the sampling and masking conventions. The box views are cut at once on `device`;
    ``batched`` (default: on every device but the CPU) cuts the foreground views at once too, else one
    roi_align per proposal (the same numbers, bit for bit; on 2 CPU threads 1.29x faster at 800 px and
    1.12x at 128 px: README, "propose and sample").
    """
    device = torch.device(device)
    batched = use_batched(batched, device)
    img = _image_tensor(image, device)
    height, width = img.shape[1:]
    masks = torch.as_tensor(np.asarray(full_masks) if not isinstance(full_masks, torch.Tensor) else full_masks)
    n = len(masks)
    if masks.shape[1:] != (height, width):
        raise PipelineError(f"features: masks of shape {tuple(masks.shape)} do not match an image of {height}x{width}")
    if len(boxes) != n:
        raise PipelineError(f"features: {len(boxes)} boxes for {n} masks")
    size = int(crop_size)
    if n == 0:
        empty = torch.zeros((0, 3, size, size), dtype=torch.float32, device=device)
        return empty, empty.clone(), empty.clone()

    padded = nn.functional.pad(img, (1, 1, 1, 1))  # one ring of zeros: exact zero padding
    squares = square_crop_boxes(boxes).to(device) + 1.0  # in padded coordinates
    rois = torch.cat([torch.zeros((n, 1), device=device), squares], dim=1)
    box_view = roi_align(padded[None], rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    # fg: multiply image and mask only inside each square's window (the pixels its samples can read), then
    # resample with the square expressed in window coordinates. Same values as resampling the full masked
    # image (the window holds every pixel the bilinear samples touch), at a cost set by the crop, not the image.
    fg_views = _fg_views if batched else _fg_views_loop
    fg_view = fg_views(padded, masks.to(device=device, dtype=torch.bool), squares, size)
    bg_view = (box_view - fg_view).clamp_min_(0.0)
    return box_view, fg_view, bg_view


_WINDOW_PIXELS = 1 << 22  # fg windows cut together: at most this many pixels (n x window height x width)


def _fg_views(padded: torch.Tensor, masks: torch.Tensor, squares: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, S, S) foreground views: each square's window of the zero-ringed image times its mask, all
    windows of a chunk at once (gathered into one (n, 3, h, w) batch, zero beyond each window) and one
    roi_align over them.

    The same numbers as one roi_align per window (`_fg_views_loop`): each roi reads its own window at
    the same origin, so its sample coordinates are the same floats; a window's zero extension is never read
    where the window is the whole square (samples stay half a pixel inside it), and where the window was cut
    at the image's zero ring the extension is zero like the ring.
    """
    n, device = len(squares), padded.device
    hp, wp = padded.shape[1:]
    lo = (squares.floor() - 1).clamp_min(0).to(torch.int64)
    hi = (squares.ceil() + 1).to(torch.int64)
    x0, y0 = lo[:, 0], lo[:, 1]
    x1, y1 = hi[:, 2].clamp(max=wp), hi[:, 3].clamp(max=hp)
    miss = (x1 <= x0) | (y1 <= y0)  # the square misses the image entirely
    win_h, win_w = (y1 - y0).clamp_min(1), (x1 - x0).clamp_min(1)
    rois = torch.cat([torch.arange(n, device=device, dtype=torch.float32)[:, None], squares], dim=1)
    rois[:, 1:] -= torch.stack([x0, y0, x0, y0], dim=1).float()  # the square in its window's coordinates
    largest = int((win_h * win_w).max())
    step = max(1, _WINDOW_PIXELS // largest)  # masks per chunk (one chunk on small images)
    views = []
    for start in range(0, n, step):
        rows = slice(start, start + step)
        window_hw = (int(win_h[rows].max()), int(win_w[rows].max()))
        views.append(
            _fg_chunk(padded, masks, (y0[rows], x0[rows], y1[rows], x1[rows]), rois[rows], window_hw, size, start)
        )
    fg = torch.cat(views) if len(views) > 1 else views[0]
    return torch.where(miss[:, None, None, None], torch.zeros((), device=device), fg)


def _fg_chunk(
    padded: torch.Tensor,
    masks: torch.Tensor,
    window: tuple[torch.Tensor, ...],
    rois: torch.Tensor,
    window_hw: tuple[int, int],
    size: int,
    first: int,
) -> torch.Tensor:
    """Foreground views of one chunk of masks (from row `first`): windows (y0, x0, y1, x1) in padded-image
    coordinates, gathered into a zero batch of `window_hw`."""
    y0, x0, y1, x1 = window
    n, (hw_h, hw_w), device = len(y0), window_hw, padded.device
    height, width = masks.shape[1:]
    rows = y0[:, None] + torch.arange(hw_h, device=device)[None]  # (n, h) in padded-image coordinates
    cols = x0[:, None] + torch.arange(hw_w, device=device)[None]
    row_ok = (rows < y1[:, None]) & (rows >= 1) & (rows <= height)  # inside the window and the image
    col_ok = (cols < x1[:, None]) & (cols >= 1) & (cols <= width)
    r = rows.clamp(1, height) - 1  # in mask (unpadded) coordinates
    c = cols.clamp(1, width) - 1
    keep = masks[torch.arange(first, first + n, device=device)[:, None, None], r[:, :, None], c[:, None, :]]
    keep &= row_ok[:, :, None] & col_ok[:, None, :]
    pixels = padded[:, rows.clamp_max(padded.shape[1] - 1)[:, :, None], cols.clamp_max(padded.shape[2] - 1)[:, None, :]]
    windows = pixels.permute(1, 0, 2, 3) * keep[:, None]
    rois = rois.clone()
    rois[:, 0] -= first
    return roi_align(windows, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _fg_views_loop(padded: torch.Tensor, masks: torch.Tensor, squares: torch.Tensor, size: int) -> torch.Tensor:
    """The foreground views one roi_align per mask (the definition `_fg_views` batches; tests, benchmark)."""
    n, device = len(squares), padded.device
    hp, wp = padded.shape[1:]
    mask_pad = torch.zeros((n, hp, wp), dtype=torch.bool, device=device)
    mask_pad[:, 1:-1, 1:-1] = masks
    lo = (squares.floor() - 1).clamp_min(0).to(torch.int64).tolist()
    hi = (squares.ceil() + 1).to(torch.int64).tolist()
    fg_parts = []
    for k in range(n):
        x0, y0 = lo[k][0], lo[k][1]
        x1, y1 = min(wp, hi[k][2]), min(hp, hi[k][3])
        if x1 <= x0 or y1 <= y0:  # the square misses the image entirely
            fg_parts.append(torch.zeros((1, 3, size, size), dtype=torch.float32, device=device))
            continue
        window = padded[:, y0:y1, x0:x1] * mask_pad[k, y0:y1, x0:x1]
        offset = torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=device)
        roi = torch.cat([torch.zeros(1, device=device), squares[k] - offset])[None]
        fg_parts.append(roi_align(window[None], roi, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True))
    return torch.cat(fg_parts)


# ------------------------------------------------------------------------------------------ backbone


class FrozenBackbone(nn.Module):
    """ImageNet normalisation → ResNet trunk → global average pool: (B, 3, S, S) in [0, 1] → (B, D)."""

    def __init__(self, resnet: nn.Module, name: str, init: str):
        super().__init__()
        resnet.fc = nn.Identity()
        if type(resnet.maxpool) is nn.MaxPool2d:  # channels-last on the CPU (cpu_paths: the same values, faster)
            resnet.maxpool.__class__ = ChannelsLastMaxPool2d
        self.resnet = resnet
        self.name = name
        self.init = init
        self.dim = BACKBONE_DIMS[name]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.resnet((views - self.mean) / self.std)


def _resnet(name: str) -> nn.Module:
    if name not in BACKBONE_DIMS:
        raise PipelineError(f"features: unknown backbone {name!r} (known: {', '.join(BACKBONE_DIMS)})")
    return getattr(torchvision.models, name)(weights=None)


def _read_torch_file(path: Path) -> object:
    if not path.is_file():
        raise PipelineError(f"{path}: backbone weights file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one line naming it
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"{path}: not a readable torch weights file ({type(err).__name__}: {first})") from err


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DistributedDataParallel 'module.' prefix when every key has it."""
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _load_trunk(resnet: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Strict load of trunk weights (no fc); num_batches_tracked may be absent (FrozenBatchNorm2d has none)."""
    target = resnet.state_dict()
    wanted = {k for k in target if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise PipelineError(f"{path}: {what} keys do not match torchvision's trunk: {'; '.join(parts)}")
    full = {k: state[k] for k in wanted}
    for key in target:
        if key.endswith("num_batches_tracked"):
            full[key] = state.get(key, target[key])
        elif key.startswith("fc."):
            full[key] = target[key]
    try:
        resnet.load_state_dict(full, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise PipelineError(f"{path}: {what} weights do not fit the trunk: {detail}") from err


def _load_proposer(resnet: nn.Module, name: str, path: Path) -> None:
    ckpt = _read_torch_file(path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise PipelineError(f"{path}: not a proposer checkpoint (expected a dict with 'state_dict' and 'backbone')")
    backbone = ckpt.get("backbone")
    if backbone != name:
        raise PipelineError(
            f"{path}: proposer checkpoint has backbone {backbone!r}, but the feature backbone is {name!r}"
        )
    state = _strip_module(ckpt["state_dict"])
    body = {k[len(_PROPOSER_PREFIX) :]: v for k, v in state.items() if k.startswith(_PROPOSER_PREFIX)}
    if not body:
        raise PipelineError(f"{path}: proposer checkpoint has no '{_PROPOSER_PREFIX}*' weights")
    _load_trunk(resnet, body, path, "proposer backbone.body")


def _load_resnet_file(resnet: nn.Module, path: Path) -> None:
    state = _read_torch_file(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path}: not a torchvision ResNet state dict")
    state = {k: v for k, v in _strip_module(state).items() if not k.startswith("fc.")}
    _load_trunk(resnet, state, path, "ResNet state dict")


def build_backbone(
    name: str,
    init: str | Path,
    *,
    seed: int,
    proposer_checkpoint: Path | str | None = None,
) -> FrozenBackbone:
    """A frozen ResNet trunk giving (B, D) pooled features of [0, 1] views.

    `init`: ``"random"`` (torchvision's init under ``torch.manual_seed(seed)``, without touching the global
    RNG), ``"proposer"`` (the body of our Mask R-CNN checkpoint `proposer_checkpoint`:
    ``{"state_dict": {"backbone.body.conv1.weight": ...}, "backbone": name}``; FrozenBatchNorm2d buffers
    become the BatchNorm statistics), or a path to a torchvision ResNet state dict (e.g. resnet18-f37072fd.pth;
    ``fc.*`` is ignored, every other key must match). Errors name the file.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        resnet = _resnet(name)
    if isinstance(init, str) and init == "random":
        label = f"random(seed={int(seed)})"
    elif isinstance(init, str) and init == "proposer":
        if proposer_checkpoint is None:
            raise PipelineError("features: init 'proposer' needs the proposer checkpoint path")
        path = Path(proposer_checkpoint)
        _load_proposer(resnet, name, path)
        label = f"proposer:{path}"
    else:
        path = Path(init)
        _load_resnet_file(resnet, path)
        label = str(path)
    return FrozenBackbone(resnet, name, label)


# ------------------------------------------------------------------------------------------- pooling


def pool_features(
    backbone: nn.Module,
    views: torch.Tensor,
    batch_size: int,
    device: str | torch.device = "cpu",
    *,
    amp: str = "off",
) -> np.ndarray:
    """(n, 3, S, S) views → (n, D) float32 features, `batch_size` views per forward, under inference_mode
    (and autocast in `amp`'s dtype: off | bf16 | fp16, `pipeline.models.inference.autocast`)."""
    device = torch.device(device)
    backbone = backbone.to(device)
    batch_size = max(1, int(batch_size))
    outs = []
    with torch.inference_mode():
        for start in range(0, len(views), batch_size):
            batch = views[start : start + batch_size].to(device, non_blocking=True)
            with autocast(device, amp):
                pooled = backbone(batch)
            outs.append(pooled.float().cpu())
    if not outs:
        return np.zeros((0, int(getattr(backbone, "dim", 0))), dtype=np.float32)
    return torch.cat(outs).numpy().astype(np.float32, copy=False)


def extract_image(
    image: np.ndarray | torch.Tensor,
    boxes: np.ndarray,
    masks_mxm: np.ndarray,
    backbone: nn.Module,
    crop_size: int,
    device: str | torch.device = "cpu",
    *,
    batch_size: int | None = None,
    full_masks: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Paste → three crops → pooled features of one image: ``{"box", "fg", "bg"}`` each (n, D) float32.

    The 3n views go through the backbone together (one forward unless `batch_size` < 3n). Pass
    `full_masks` (the (n, H, W) paste of `masks_mxm`) to reuse a paste already made for the relations.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    if full_masks is None:
        full_masks = paste_masks(masks_mxm, boxes, (height, width))
    n = len(full_masks)
    if n == 0:
        dim = int(getattr(backbone, "dim", 0))
        return {k: np.zeros((0, dim), dtype=np.float32) for k in ("box", "fg", "bg")}
    box_view, fg_view, bg_view = crop_views(image, boxes, full_masks, crop_size, device=device)
    views = torch.cat([box_view, fg_view, bg_view])
    feats = pool_features(backbone, views, batch_size or len(views), device)
    return {"box": feats[:n], "fg": feats[n : 2 * n], "bg": feats[2 * n :]}
