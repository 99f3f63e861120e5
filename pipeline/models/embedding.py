"""Self-supervised embedding of mask proposals: head, triplet losses, negative sampling, inference, saving.

Inputs are the `sample` stage's arrays: pooled backbone features of three crops of every proposal
(`box`: the square crop around the box, `fg`: the same crop with the background masked out, `bg`: with
the foreground masked out), `image_offsets` (image i owns rows offsets[i]:offsets[i+1]), `object_pairs`
(P, 2) overlapping proposals of one object and `hier_pairs` (Q, 2) (parent, child).

The three terms (Weng et al., CVPR 2021), each a hinge with margin m on distances d of the geometry:

- mask:   mean max(0, d(box, fg) - d(box, bg) + m), the three views of one proposal;
- object: mean max(0, d(a, p) - d(a, n) + m), (a, p) an object pair and n a proposal that is not
  an object pair of a: from the same image (probability `same_image_negatives`) or another image of
  the same block;
- hier:   mean max(0, d0(parent) - d0(child) + m), d0 the distance to the origin.

The object and hier terms embed one view of each proposal, the same view that is embedded for clustering
(`embed.view`): the foreground crop `fg` by default, as the released code (`crop(image, box, mask)` for
every proposal's feature), or the square `box` crop (the earlier choice, kept as an ablation: two
overlapping proposals then have nearly the same crop, and a child's box crop is a zoomed piece of its
parent's context). The mask term always uses all three views.

The head starts as the released code's (`init="released"`: weights U(-1e-4, 1e-4), zero biases, so every
embedding starts at the origin and every triplet starts active) or with PyTorch's default initialisation
(`init="torch"`).

Training (`pipeline.models.embedding_train.train_embedder`) streams the split from the samples store by blocks
of whole images (`pipeline.models.embedding_data`): batches, pair cycles and negatives are drawn within the
block in memory, and only a batch goes to the device; a split that fits one block (the embedded world)
trains exactly as when the whole split was held in memory. Inference (`embed_batches`) is batch by
batch, so the embeddings can be written as they are made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.device import pick_device
from pipeline.errors import PipelineError
from pipeline.geometry.hyperbolic import dist, dist0, expmap0, project
from pipeline.stores.store import torch_bytes, write_bytes

GEOMETRIES = ("poincare", "euclidean")
TERMS = ("mask", "object", "hier")
EMBEDDED_VIEWS = ("fg", "box")  # what `embed.view` may choose for the object and hier terms and clustering
INITS = ("released", "torch")
RELEASED_INIT_BOUND = 1e-4  # the released head's U(-1e-4, 1e-4) weights
HEAD_FORMAT = "embedding-head/1"
_SAMPLE_CELLS = 1 << 22  # candidate cells per chunk when sampling same-image negatives

DistFn = Callable[[Tensor, Tensor], Tensor]
NormFn = Callable[[Tensor], Tensor]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# ----------------------------------------------------------------------------------------------- head


class EmbeddingHead(nn.Module):
    """MLP in_dim -> hidden... -> dim, then expmap0 into the Poincaré ball of curvature c (or identity).

    `hidden` is an int h (two hidden layers: in_dim -> h -> h -> dim) or a sequence of hidden widths
    (e.g. [256] for in_dim -> 256 -> dim); ReLU between layers, none after the last. Poincaré outputs
    are projected after expmap0, so they lie strictly inside the ball (c |x|^2 < 1) even for huge inputs.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int | Sequence[int] = 256,
        dim: int = 256,
        geometry: str = "poincare",
        c: float = 1.0,
        init: str = "torch",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise PipelineError(f"embedding head init must be one of {', '.join(INITS)}, got {init!r}")
        if geometry not in GEOMETRIES:
            raise PipelineError(f"embedding geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
        if geometry == "poincare" and not (isinstance(c, int | float) and math.isfinite(c) and c > 0):
            raise PipelineError(f"embedding curvature c must be a positive number, got {c!r}")
        widths = [int(hidden)] * 2 if isinstance(hidden, int) else [int(w) for w in hidden]
        if int(in_dim) < 1 or int(dim) < 1 or any(w < 1 for w in widths):
            raise PipelineError(f"embedding head sizes must be positive: in_dim={in_dim}, hidden={hidden}, dim={dim}")
        layers: list[nn.Module] = []
        prev = int(in_dim)
        for width in widths:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        layers.append(nn.Linear(prev, int(dim)))
        self.mlp = nn.Sequential(*layers)
        if init == "released":  # the released HResNet._init_embedding_weights
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.uniform_(layer.weight, -RELEASED_INIT_BOUND, RELEASED_INIT_BOUND)
                    nn.init.zeros_(layer.bias)
        self.in_dim = int(in_dim)
        self.hidden: int | list[int] = int(hidden) if isinstance(hidden, int) else widths
        self.dim = int(dim)
        self.geometry = geometry
        self.c = float(c)
        self.meta: dict[str, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        """The constructor's arguments (what `save_head` stores to rebuild the head)."""
        return {"in_dim": self.in_dim, "hidden": self.hidden, "dim": self.dim, "geometry": self.geometry, "c": self.c}

    def forward(self, features: Tensor) -> Tensor:
        z = self.mlp(features)
        if self.geometry == "poincare":
            z = project(expmap0(z, self.c), self.c)
        return z

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance between rows of x and y (last axis reduced): geodesic in the ball, or L2."""
        if self.geometry == "poincare":
            return dist(x, y, self.c)
        return torch.linalg.vector_norm(x - y, dim=-1)

    def norm_distance(self, x: Tensor) -> Tensor:
        """Distance of each row to the origin: geodesic in the ball, or |x|."""
        if self.geometry == "poincare":
            return dist0(x, self.c)
        return torch.linalg.vector_norm(x, dim=-1)

    def extra_repr(self) -> str:
        return f"geometry={self.geometry}, c={self.c}"


# --------------------------------------------------------------------------------------------- losses

MARGIN_RULES = ("half", "same")


def geometry_margin(margin: float, geometry: str, rule: str = "half") -> float:
    """The triplet margin in the units of `geometry`'s distances, for a `margin` given in the ball's.

    Both heads map the same MLP output u: the ball's to expmap0(u), whose distance to the origin is exactly
    2|u| (any curvature), the Euclidean one to u itself, at distance |u|; near the origin the ball's metric is
    twice the Euclidean one (ds = 2|dx| / (1 - c|x|^2)). So `rule="half"` trains the Euclidean head with
    margin / 2, the same margin measured at the origin, where the released initialisation starts every
    embedding; `rule="same"` uses one number for both (the released code: 0.2), which makes the ball's
    triplets satisfied sooner and compares the geometries at different effective margins.
    """
    if rule not in MARGIN_RULES:
        raise PipelineError(f"euclidean margin rule must be one of {', '.join(MARGIN_RULES)}, got {rule!r}")
    return margin / 2 if geometry == "euclidean" and rule == "half" else margin


def hinge_mean(x: Tensor) -> Tensor:
    """A term's loss from its hinges: mean(max(0, x)); 0 (still attached to the graph) for an empty x; NaN
    propagates."""
    if x.numel() == 0:
        return x.sum()
    return torch.relu(x).mean()


def triplet_hinges(anchor: Tensor, positive: Tensor, negative: Tensor, dist_fn: DistFn, margin: float) -> Tensor:
    """d(anchor, positive) - d(anchor, negative) + margin per row: a triplet is active (has a gradient) when > 0."""
    return dist_fn(anchor, positive) - dist_fn(anchor, negative) + margin


def hier_hinges(parent: Tensor, child: Tensor, d0_fn: NormFn, margin: float) -> Tensor:
    """d0(parent) - d0(child) + margin per pair: active when > 0."""
    return d0_fn(parent) - d0_fn(child) + margin


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, dist_fn: DistFn, margin: float) -> Tensor:
    """mean max(0, d(anchor, positive) - d(anchor, negative) + margin) over rows."""
    return hinge_mean(triplet_hinges(anchor, positive, negative, dist_fn, margin))


def mask_loss(box: Tensor, fg: Tensor, bg: Tensor, dist_fn: DistFn, margin: float) -> Tensor:
    """Mask term: anchor = box view, positive = foreground view, negative = background view."""
    return triplet_loss(box, fg, bg, dist_fn, margin)


def object_loss(anchor: Tensor, positive: Tensor, negative: Tensor, dist_fn: DistFn, margin: float) -> Tensor:
    """Object term: (anchor, positive) an object pair, negative a proposal that is not one of anchor's."""
    return triplet_loss(anchor, positive, negative, dist_fn, margin)


def hier_loss(parent: Tensor, child: Tensor, d0_fn: NormFn, margin: float) -> Tensor:
    """Hierarchy term: mean max(0, d0(parent) - d0(child) + margin); parents sit nearer the origin."""
    return hinge_mean(hier_hinges(parent, child, d0_fn, margin))


# ------------------------------------------------------------------------------------------- sampling


def object_pair_keys(object_pairs: np.ndarray, n: int) -> np.ndarray:
    """Sorted int64 keys i * n + j of the object pairs, both orientations (for `sample_object_negatives`)."""
    pairs = np.asarray(object_pairs, dtype=np.int64).reshape(-1, 2)
    return np.unique(np.concatenate([pairs[:, 0] * n + pairs[:, 1], pairs[:, 1] * n + pairs[:, 0]]))


def _in_sorted(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if keys.size == 0:
        return np.zeros(query.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return keys[pos] == query


def _uniform_index(generator: torch.Generator, high: np.ndarray) -> np.ndarray:
    """One uniform integer in [0, high[i]) per entry (high >= 1), drawn from the torch generator."""
    u = torch.rand(high.shape[0], generator=generator, dtype=torch.float64).numpy()
    return np.minimum((u * high).astype(np.int64), high - 1)


def sample_object_negatives(
    pairs: np.ndarray,
    image_offsets: np.ndarray,
    object_pairs_set: np.ndarray | Collection[tuple[int, int]],
    generator: torch.Generator,
    same_image_prob: float = 0.25,
) -> np.ndarray:
    """One negative proposal per (anchor, positive) row of `pairs`; -1 where none exists.

    A negative is never the anchor or the positive, and never forms an object pair with the anchor
    (`object_pairs_set`: the keys of `object_pair_keys`, or a collection of (i, j) pairs, either order).
    With probability `same_image_prob` (always, when there is a single image) it is drawn uniformly among
    the valid proposals of the anchor's own image (another image's when the own image has none),
    otherwise uniformly among the proposals of all other images (which never overlap the anchor).
    Seeded by `generator` only.
    """
    offsets = np.asarray(image_offsets, dtype=np.int64)
    n = int(offsets[-1])
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if isinstance(object_pairs_set, np.ndarray) and object_pairs_set.ndim == 1:
        keys = object_pairs_set
    else:
        keys = object_pair_keys(np.asarray(list(object_pairs_set), dtype=np.int64), n)
    anchor, positive = pairs[:, 0], pairs[:, 1]
    image = np.searchsorted(offsets, anchor, side="right") - 1
    start, size = offsets[image], offsets[image + 1] - offsets[image]
    room = n - size  # proposals in other images
    negative = np.full(len(pairs), -1, dtype=np.int64)
    if len(pairs) == 0:
        return negative

    u = torch.rand(len(pairs), generator=generator, dtype=torch.float64).numpy()
    same = np.flatnonzero(((u < same_image_prob) | (room == 0)) & (size > 0))
    if same.size:  # exact: uniform over the image's valid candidates (argmax of uniform scores)
        width = int(size[same].max())
        for chunk in np.array_split(same, -(-same.size * width // _SAMPLE_CELLS)):
            cand = start[chunk, None] + np.arange(width)[None, :]
            a = anchor[chunk, None]
            valid = (cand < (start + size)[chunk, None]) & (cand != a) & (cand != positive[chunk, None])
            valid &= ~_in_sorted(a * n + cand, keys)
            score = torch.rand(cand.shape, generator=generator, dtype=torch.float64).numpy()
            score[~valid] = -1.0
            best = score.argmax(axis=1)
            found = valid[np.arange(chunk.size), best]
            negative[chunk[found]] = cand[np.arange(chunk.size), best][found]

    other = np.flatnonzero((negative < 0) & (room > 0))
    if other.size:
        draw = _uniform_index(generator, room[other])
        negative[other] = np.where(draw < start[other], draw, draw + size[other])
    return negative


# ------------------------------------------------------------------------------------------ inference


def embed_batches(
    head: EmbeddingHead,
    features_box: Any,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """(rows, dim) float32 embeddings of one view's features (`embed.view`), `batch_size` rows at a time in row
    order.

    `features_box` may be any array-like sliceable along rows (numpy, zarr, any float dtype): it is read
    batch by batch, so a caller can write each batch out and hold no more than one. The head is moved to
    `device` (in place) and put in eval mode. Rows that are NaN/inf raise PipelineError after the last
    batch (counted over all rows).
    """
    dev = torch.device(pick_device(device))
    shape = getattr(features_box, "shape", None) or np.shape(features_box)
    if len(shape) != 2 or shape[1] != head.in_dim:
        raise PipelineError(f"embedding: features have shape {tuple(shape)}, the head expects (N, {head.in_dim})")
    n = int(shape[0])
    head.to(dev).eval()
    batch_size = max(1, int(batch_size))

    def batches() -> Iterator[np.ndarray]:
        bad, first_bad = 0, -1
        for i in tqdm(range(0, n, batch_size), desc="embed", unit="batch", disable=not progress):
            rows = np.ascontiguousarray(features_box[i : i + batch_size], dtype=np.float32)
            with torch.inference_mode():
                out = head(torch.from_numpy(rows).to(dev)).float().cpu().numpy()
            finite = np.isfinite(out).all(axis=1)
            if not finite.all():
                first_bad = i + int(np.argmin(finite)) if first_bad < 0 else first_bad
                bad += int((~finite).sum())
            yield out
        if bad:
            raise PipelineError(f"embedding: {bad} of {n} embeddings are NaN/inf (first row {first_bad})")

    return batches()


def embed_features(
    head: EmbeddingHead,
    features_box: Any,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """(N, dim) float32 embeddings of one view's features (strictly inside the ball), in memory.

    `embed_batches` without holding the batches: same arguments, same checks.
    """
    n = int((getattr(features_box, "shape", None) or np.shape(features_box))[0])
    out = np.empty((n, head.dim), dtype=np.float32)
    pos = 0
    for rows in embed_batches(head, features_box, batch_size, device, progress):
        out[pos : pos + len(rows)] = rows
        pos += len(rows)
    return out


# ------------------------------------------------------------------------------------------ save/load


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_head(head: EmbeddingHead, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the head's config, weights (CPU) and JSON-able `meta` atomically (temporary file, then rename)."""
    path = Path(path)
    try:
        meta_json = json.loads(json.dumps(dict(meta or {}), default=_jsonable))
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{path}: head meta is not JSON-serialisable ({_one_line(err)})") from None
    payload = {
        "format": HEAD_FORMAT,
        "config": head.config,
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "meta": meta_json,
    }
    write_bytes(path, torch_bytes(payload))
    return path


def load_head(path: str | Path, map_location: str | torch.device = "cpu") -> EmbeddingHead:
    """Rebuild a head written by `save_head` (eval mode, `head.meta` holds the saved meta)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: embedding head not found (run the embed stage first)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing error
        raise PipelineError(f"{path}: not a readable embedding head ({_one_line(err)})") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != HEAD_FORMAT:
        raise PipelineError(f"{path}: not an embedding head of format {HEAD_FORMAT!r} (found {found!r})")
    try:
        head = EmbeddingHead(**payload["config"])
        head.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, PipelineError) as err:
        raise PipelineError(f"{path}: incompatible embedding head ({_one_line(err)})") from None
    head.meta = dict(payload.get("meta") or {})
    return head.to(map_location).eval()
