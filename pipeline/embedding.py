"""Self-supervised embedding of mask proposals: head, triplet losses, training loop, saving.

Inputs are the `sample` stage's arrays: pooled backbone features of three crops of every proposal
(`box`: the square crop around the box, `fg`: the same crop with the background masked out, `bg`: with
the foreground masked out), `image_offsets` (image i owns rows offsets[i]:offsets[i+1]), `object_pairs`
(P, 2) overlapping proposals of one object and `hier_pairs` (Q, 2) (parent, child).

The three terms (Weng et al., CVPR 2021), each a hinge with margin m on distances d of the geometry:

- mask:   mean max(0, d(box, fg) - d(box, bg) + m), the three views of one proposal;
- object: mean max(0, d(a, p) - d(a, n) + m), (a, p) an object pair and n a proposal that is not
  an object pair of a: from the same image (probability `same_image_negatives`) or another image;
- hier:   mean max(0, d0(parent) - d0(child) + m), d0 the distance to the origin.

The object and hier terms embed the *box* view of each proposal, the same view `embed_features` returns
for clustering; only the mask term uses the fg and bg views.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.device import pick_device
from pipeline.errors import PipelineError
from pipeline.hyperbolic import dist, dist0, expmap0, project
from pipeline.store import torch_bytes, write_bytes

GEOMETRIES = ("poincare", "euclidean")
TERMS = ("mask", "object", "hier")
HEAD_FORMAT = "embedding-head/1"
_SAMPLE_CELLS = 1 << 22  # candidate cells per chunk when sampling same-image negatives
_EVAL_BATCH = 8192

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
    ) -> None:
        super().__init__()
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


def _hinge_mean(x: Tensor) -> Tensor:
    """mean(max(0, x)); 0 (still attached to the graph) for an empty x; NaN propagates."""
    if x.numel() == 0:
        return x.sum()
    return torch.relu(x).mean()


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, dist_fn: DistFn, margin: float) -> Tensor:
    """mean max(0, d(anchor, positive) - d(anchor, negative) + margin) over rows."""
    return _hinge_mean(dist_fn(anchor, positive) - dist_fn(anchor, negative) + margin)


def mask_loss(box: Tensor, fg: Tensor, bg: Tensor, dist_fn: DistFn, margin: float) -> Tensor:
    """Mask term: anchor = box view, positive = foreground view, negative = background view."""
    return triplet_loss(box, fg, bg, dist_fn, margin)


def object_loss(anchor: Tensor, positive: Tensor, negative: Tensor, dist_fn: DistFn, margin: float) -> Tensor:
    """Object term: (anchor, positive) an object pair, negative a proposal that is not one of anchor's."""
    return triplet_loss(anchor, positive, negative, dist_fn, margin)


def hier_loss(parent: Tensor, child: Tensor, d0_fn: NormFn, margin: float) -> Tensor:
    """Hierarchy term: mean max(0, d0(parent) - d0(child) + margin); parents sit nearer the origin."""
    return _hinge_mean(d0_fn(parent) - d0_fn(child) + margin)


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


class _Cycler:
    """Batch-sized slices of a shuffled range(n); reshuffled (seeded) each time it runs out."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.order = np.zeros(0, dtype=np.int64)
        self.pos = 0

    def take(self, k: int) -> np.ndarray:
        k = min(k, self.n)
        out = []
        while k > 0:
            if self.pos >= self.order.size:
                self.order = torch.randperm(self.n, generator=self.generator).numpy()
                self.pos = 0
            part = self.order[self.pos : self.pos + k]
            self.pos += part.size
            k -= part.size
            out.append(part)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------- training


def _check_pairs(name: str, pairs: Any, n: int) -> np.ndarray:
    arr = np.asarray(pairs if pairs is not None else np.zeros((0, 2)), dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise PipelineError(f"embedding: {name} pairs must have shape (P, 2), got {arr.shape}")
    if arr.min() < 0 or arr.max() >= n:
        raise PipelineError(f"embedding: {name} pairs index proposals outside 0..{n - 1}")
    return arr


def _check_inputs(
    features: Mapping[str, np.ndarray], image_offsets: Any, needed: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    missing = [k for k in needed if k not in features]
    if missing:
        raise PipelineError(f"embedding: features lack the {', '.join(missing)} view(s) (expected keys box, fg, bg)")
    views = {k: np.require(np.asarray(features[k], dtype=np.float32), requirements=["C", "W"]) for k in needed}
    shape = views["box"].shape
    for k, v in views.items():
        if v.ndim != 2 or v.shape != shape:
            raise PipelineError(f"embedding: features[{k!r}] has shape {v.shape}, expected (N, D) like box {shape}")
    n = shape[0]
    if n == 0:
        raise PipelineError("embedding: no proposals to train on (features are empty)")
    offsets = np.asarray(image_offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
        raise PipelineError(f"embedding: image_offsets must rise from 0 to N={n} (got {offsets.size} entries)")
    return views, offsets


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(TERMS))
    missing = [t for t in TERMS if t not in weights]
    if unknown or missing:
        raise PipelineError(
            f"embedding: loss weights need exactly the keys {', '.join(TERMS)} (missing: {missing}, unknown: {unknown})"
        )
    out = {t: float(weights[t]) for t in TERMS}
    bad = [t for t, w in out.items() if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise PipelineError(f"embedding: loss weight(s) {', '.join(bad)} must be finite and >= 0")
    if not any(out.values()):
        raise PipelineError("embedding: every loss weight is 0, nothing to train")
    return out


def _d0_stats(head: EmbeddingHead, box: Tensor, pairs: np.ndarray, device: torch.device) -> dict[str, float]:
    """Mean distance to the origin of the parents and of the children of `pairs` (box view)."""
    ids, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    d0 = torch.empty(ids.size, dtype=torch.float64)
    ids_t = torch.from_numpy(ids)
    with torch.no_grad():
        for i in range(0, ids.size, _EVAL_BATCH):
            rows = box[ids_t[i : i + _EVAL_BATCH].to(device)]
            d0[i : i + _EVAL_BATCH] = head.norm_distance(head(rows)).double().cpu()
    d0_np = d0.numpy()
    return {"d0_parent": float(d0_np[inverse[:, 0]].mean()), "d0_child": float(d0_np[inverse[:, 1]].mean())}


def train_embedder(
    features: Mapping[str, np.ndarray],
    image_offsets: np.ndarray,
    object_pairs: np.ndarray | None,
    hier_pairs: np.ndarray | None,
    *,
    hidden: int | Sequence[int] = 256,
    dim: int = 256,
    geometry: str = "poincare",
    c: float = 1.0,
    margin: float = 0.2,
    weights: Mapping[str, float],
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    same_image_negatives: float = 0.25,
    max_eval_pairs: int = 100_000,
) -> tuple[EmbeddingHead, list[dict[str, float]]]:
    """Train an `EmbeddingHead` with the weighted mask/object/hier triplet terms; return (head, history).

    `features` maps "box", "fg", "bg" to (N, D) float arrays ("fg"/"bg" only needed when the mask term
    is on). An epoch visits every proposal once in seeded shuffled batches of `batch_size`; each step
    adds the mask term on its proposals, the object term on the next `batch_size` object pairs (a
    seeded, reshuffled cycle over all pairs) with freshly sampled negatives, and the hier term on the
    next `batch_size` hier pairs. A zero weight skips its term and its sampling (the term is then absent
    from the history); a non-zero weight without pairs warns once and contributes zero. Adam with a
    cosine schedule over all steps. NaN/inf in a term raises PipelineError naming the step and term.

    history[e] (also passed to `log(e, metrics)` after each epoch): the mean of each active term over
    the epoch's steps, "total" (weighted sum), "d0_parent"/"d0_child" (mean distance to the origin over
    the hier pairs, at most `max_eval_pairs` of them, at the end of the epoch; absent without hier
    pairs), "lr" (at the end of the epoch), "triplets" (triplets trained on) and "seconds".
    The head is returned in eval mode on `device`. Deterministic on the CPU for a fixed seed.
    """
    w = _check_weights(weights)
    needed = ["box", "fg", "bg"] if w["mask"] > 0 else ["box"]
    views, offsets = _check_inputs(features, image_offsets, needed)
    n, in_dim = views["box"].shape
    obj = _check_pairs("object", object_pairs, n)
    hier = _check_pairs("hier", hier_pairs, n)
    if int(epochs) < 1 or int(batch_size) < 1:
        raise PipelineError(f"embedding: epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (math.isfinite(margin) and margin >= 0):
        raise PipelineError(f"embedding: margin must be >= 0, got {margin}")
    epochs, batch_size = int(epochs), int(batch_size)
    dev = torch.device(pick_device(device))

    for term, count in (("object", len(obj)), ("hier", len(hier))):
        if w[term] > 0 and count == 0:
            warnings.warn(
                f"embedding: loss.{term} = {w[term]:g} but there are no {term} pairs; the {term} term contributes 0",
                stacklevel=2,
            )
    active = [t for t in TERMS if w[t] > 0]
    use_obj = w["object"] > 0 and len(obj) > 0
    use_hier = w["hier"] > 0 and len(hier) > 0
    if not (w["mask"] > 0 or use_obj or use_hier):
        raise PipelineError(f"embedding: nothing to train: the active term(s) {', '.join(active)} have no pairs")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EmbeddingHead(in_dim, hidden, dim, geometry, c)
    head.to(dev).train()
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.from_numpy(v).to(dev) for k, v in views.items()}
    box = tensors["box"]
    keys = object_pair_keys(obj, n) if use_obj else np.zeros(0, dtype=np.int64)
    obj_cycle = _Cycler(len(obj), generator) if use_obj else None
    hier_cycle = _Cycler(len(hier), generator) if use_hier else None
    eval_pairs = hier
    if len(hier) > max_eval_pairs:
        eval_pairs = hier[np.sort(np.random.default_rng(seed).choice(len(hier), max_eval_pairs, replace=False))]

    steps_per_epoch = -(-n // batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    sizes = [min(batch_size, n - s * batch_size) for s in range(steps_per_epoch)]
    planned = sum(b * (w["mask"] > 0) + min(b, len(obj)) * use_obj + min(b, len(hier)) * use_hier for b in sizes)
    bar = tqdm(
        total=planned * epochs, unit="triplet", unit_scale=True, disable=not progress, desc="embed", dynamic_ncols=True
    )
    zero = torch.zeros((), device=dev)
    history: list[dict[str, float]] = []
    step = 0
    try:
        for epoch in range(epochs):
            started = time.perf_counter()
            sums = dict.fromkeys(active, 0.0)
            total_sum, triplets = 0.0, 0
            perm = torch.randperm(n, generator=generator)
            for s in range(steps_per_epoch):
                idx = perm[s * batch_size : (s + 1) * batch_size].to(dev)
                chunks: dict[str, list[Tensor]] = {}
                if w["mask"] > 0:
                    chunks["mask"] = [box[idx], tensors["fg"][idx], tensors["bg"][idx]]
                if use_obj:
                    pairs = obj[obj_cycle.take(len(idx))]
                    negatives = sample_object_negatives(pairs, offsets, keys, generator, same_image_negatives)
                    keep = negatives >= 0
                    rows = torch.from_numpy(np.stack([pairs[keep, 0], pairs[keep, 1], negatives[keep]])).to(dev)
                    chunks["object"] = [box[rows[0]], box[rows[1]], box[rows[2]]]
                if use_hier:
                    rows = torch.from_numpy(hier[hier_cycle.take(len(idx))].T.copy()).to(dev)
                    chunks["hier"] = [box[rows[0]], box[rows[1]]]
                flat = [t for parts in chunks.values() for t in parts]
                z = head(torch.cat(flat)).split([len(t) for t in flat])
                emb: dict[str, tuple[Tensor, ...]] = {}
                pos = 0
                for term, parts in chunks.items():
                    emb[term] = z[pos : pos + len(parts)]
                    pos += len(parts)
                    triplets += len(parts[0])

                terms: dict[str, Tensor] = {}
                for term in active:
                    if term not in emb:
                        terms[term] = zero
                    elif term == "mask":
                        terms[term] = mask_loss(*emb[term], head.distance, margin)
                    elif term == "object":
                        terms[term] = object_loss(*emb[term], head.distance, margin)
                    else:
                        terms[term] = hier_loss(*emb[term], head.norm_distance, margin)
                total = sum(w[t] * terms[t] for t in active)
                values = torch.stack([terms[t].detach() for t in active] + [total.detach()]).tolist()
                for term, value in zip(active + ["total"], values, strict=True):
                    if not math.isfinite(value):
                        raise PipelineError(
                            f"embedding: the {term} loss is {value} at step {step} (epoch {epoch}, batch {s}); "
                            "check the features for NaN/inf or lower the learning rate"
                        )
                optimizer.zero_grad(set_to_none=True)
                if total.requires_grad:
                    total.backward()
                    optimizer.step()
                scheduler.step()
                step += 1
                for term, value in zip(active, values, strict=False):
                    sums[term] += value
                total_sum += values[-1]
                bar.update(sum(len(parts[0]) for parts in chunks.values()))
                if s % 20 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{values[-1]:.4f}", refresh=False)

            metrics = {t: sums[t] / steps_per_epoch for t in active}
            metrics["total"] = total_sum / steps_per_epoch
            if len(eval_pairs):
                head.eval()
                metrics.update(_d0_stats(head, box, eval_pairs, dev))
                head.train()
            metrics["lr"] = float(scheduler.get_last_lr()[0])
            metrics["triplets"] = float(triplets)
            metrics["seconds"] = time.perf_counter() - started
            history.append(metrics)
            bar.set_postfix(epoch=epoch, loss=f"{metrics['total']:.4f}", refresh=True)
            if log is not None:
                log(epoch, dict(metrics))
    finally:
        bar.close()
    return head.eval(), history


# ------------------------------------------------------------------------------------------ inference


def embed_features(
    head: EmbeddingHead,
    features_box: np.ndarray,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """(N, dim) float32 embeddings of the box view of each proposal (strictly inside the ball).

    `features_box` may be any array-like sliceable along rows (numpy, zarr): it is read batch by batch.
    The head is moved to `device` (in place) and put in eval mode.
    """
    dev = torch.device(pick_device(device))
    shape = getattr(features_box, "shape", None) or np.shape(features_box)
    if len(shape) != 2 or shape[1] != head.in_dim:
        raise PipelineError(f"embedding: features have shape {tuple(shape)}, the head expects (N, {head.in_dim})")
    n = int(shape[0])
    out = np.empty((n, head.dim), dtype=np.float32)
    head.to(dev).eval()
    batch_size = max(1, int(batch_size))
    with torch.inference_mode():
        for i in tqdm(range(0, n, batch_size), desc="embed", unit="batch", disable=not progress):
            x = torch.from_numpy(np.ascontiguousarray(features_box[i : i + batch_size], dtype=np.float32)).to(dev)
            out[i : i + batch_size] = head(x).float().cpu().numpy()
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise PipelineError(f"embedding: {int(bad.sum())} of {n} embeddings are NaN/inf (first row {np.argmax(bad)})")
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
