"""Training of the embedding head: streamed by blocks of images, checkpointed, resumable after a kill.

`train_embedder` reads the samples store by blocks of whole images (`pipeline.models.embedding_data`) and
trains the head of `pipeline.models.embedding` with its three triplet terms (mask, object, hier). Each block
is shuffled with a seeded generator, its object and hier pairs are cycled through in seeded order and
object negatives are drawn from the block (the anchor's image, or another image of the block); only a
batch, converted to float32, goes to the device. A split that fits one block (the embedded world:
about 3,600 proposals x 512 dims is far below `BLOCK_BYTES`) trains exactly as the former whole-split
training did: same random draws, same weights, same history.

With a `pipeline.stores.checkpoint.Checkpoint`, the full state (head, optimizer, scheduler, position in the
epoch, the block's shuffle and pair cycles, the generator and the global RNG, the epoch's running sums
and the history) is saved every `checkpoint_every` steps; a rerun resumes from it and ends, on the CPU,
with the weights and history of an uninterrupted run.

Under torchrun (`ranks` of several processes) the global batch stays `batch_size`: every rank reads the same
blocks and draws the same shuffles, pairs and negatives from the same seeded generator, embeds its share of
each step's triplets (every `world_size`-th one) through DistributedDataParallel, and the all-reduced gradient
is the gradient of the global batch's loss. So the learning rate and the schedule do not change with the
number of ranks, and the head equals the one-process head up to the order of floating-point sums.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pipeline.device import pick_device
from pipeline.distributed import Ranks
from pipeline.errors import PipelineError
from pipeline.models.embedding import (
    EMBEDDED_VIEWS,
    TERMS,
    EmbeddingHead,
    hier_hinges,
    hinge_mean,
    object_pair_keys,
    sample_object_negatives,
    triplet_hinges,
)
from pipeline.models.embedding_data import Block, SampleBlocks, batch_sizes, block_loader, block_order, block_plan
from pipeline.stores.checkpoint import Checkpoint, rng_state, set_rng_state

TRAIN_STATE_FORMAT = "embedding-train/2"
SCHEDULES = ("cosine", "constant")
_EVAL_BATCH = 8192

_log = logging.getLogger(__name__)


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

    def state(self) -> tuple[int, np.ndarray, int]:
        """What `restore` needs to go on exactly where this cycle is (for a checkpoint)."""
        return self.n, self.order.copy(), self.pos

    @classmethod
    def restore(cls, state: tuple[int, np.ndarray, int] | None, generator: torch.Generator) -> _Cycler | None:
        if state is None:
            return None
        n, order, pos = state
        cycler = cls(int(n), generator)
        cycler.order, cycler.pos = np.asarray(order, dtype=np.int64), int(pos)
        return cycler


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


def _d0_stats(
    head: EmbeddingHead, rows: Callable[[np.ndarray], Tensor], pairs: np.ndarray, device: torch.device
) -> dict[str, float]:
    """Mean distance to the origin of the parents and of the children of `pairs` (the embedded view).

    `rows(ids)` returns the embedded view's features of the sorted rows `ids` (CPU, any float dtype); they go to the
    device `_EVAL_BATCH` rows at a time.
    """
    ids, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    d0 = torch.empty(ids.size, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, ids.size, _EVAL_BATCH):
            x = rows(ids[i : i + _EVAL_BATCH]).to(device).float()
            d0[i : i + _EVAL_BATCH] = head.norm_distance(head(x)).double().cpu()
    d0_np = d0.numpy()
    return {"d0_parent": float(d0_np[inverse[:, 0]].mean()), "d0_child": float(d0_np[inverse[:, 1]].mean())}


def initial_head(
    in_dim: int, hidden: int | Sequence[int], dim: int, geometry: str, c: float, *, seed: int, init: str
) -> EmbeddingHead:
    """The head `train_embedder` starts from for these arguments (seeded, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EmbeddingHead(in_dim, hidden, dim, geometry, c, init=init)


def _compatible(state: Mapping[str, Any], plan: Mapping[str, Any]) -> bool:
    return state.get("format") == TRAIN_STATE_FORMAT and state.get("plan") == plan


def train_embedder(
    features: Mapping[str, Any],
    image_offsets: Any,
    object_pairs: Any,
    hier_pairs: Any,
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
    block_rows: int | None = None,
    num_workers: int = 0,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 100,
    view: str = "box",
    init: str = "torch",
    schedule: str = "cosine",
    ranks: Ranks | None = None,
) -> tuple[EmbeddingHead, list[dict[str, float]]]:
    """Train an `EmbeddingHead` with the weighted mask/object/hier triplet terms; return (head, history).

    `features` maps "box", "fg", "bg" to (N, D) arrays sliceable by rows: the samples store's zarr
    arrays (any float dtype; float16 on disk is converted to float32 batch by batch) or numpy ("fg"/"bg"
    only needed when the mask term is on). `image_offsets` (n_images + 1), `object_pairs` (P, 2) and
    `hier_pairs` (Q, 2, parent first) index rows of the split; pairs lie within one image.

    The split is read by blocks of whole images (`pipeline.models.embedding_data`: at most `block_rows` rows,
    by default about `BLOCK_BYTES` of features), through a DataLoader with `num_workers` reader
    processes; only one block per reader and the current batch are in memory, only the batch on the
    device. An epoch visits the blocks in a seeded random order (depending on seed and epoch only) and
    every proposal of a block once, in seeded shuffled batches of `batch_size` (a block's last batch
    may be smaller); each step adds the mask term on its proposals, the object term on the next
    `batch_size` object pairs of the block (a seeded, reshuffled cycle over the block's pairs, restarted
    whenever the block in memory changes) with freshly sampled negatives from the block, and the hier term on
    the next `batch_size` hier pairs of the block. When the split is one block (N <= block_rows) this
    is exactly the former whole-split training: same draws, same weights and history for a seed.
    A zero weight skips its term and its sampling (the term is then absent from the history); a
    non-zero weight without pairs warns once and contributes zero. The object and hier terms embed the
    `view` ("fg" or "box") features; the head starts with `init` ("released" or "torch", see
    `EmbeddingHead`). Adam, with the learning rate decayed to 0 over all steps by a cosine
    (`schedule="cosine"`) or held (`"constant"`: the released code's CosineAnnealingLR(T_max=60000) stepped
    once per epoch is constant to 1e-3 relative over its 80 epochs). NaN/inf in a term raises
    PipelineError naming the step and term.

    history[e] (also passed to `log(e, metrics)` after each epoch): the mean of each active term over
    the epoch's steps, "total" (weighted sum), "d0_parent"/"d0_child" (mean distance to the origin over
    the hier pairs, at most `max_eval_pairs` of them, at the end of the epoch; absent without hier
    pairs), "active/<term>" (the share of the term's triplets whose hinge was > 0, i.e. that had a gradient),
    "lr" (at the end of the epoch), "triplets" (triplets trained on) and "seconds".

    With a `checkpoint` (`pipeline.stores.checkpoint.Checkpoint`), the full training state (head, optimizer,
    scheduler, position, shuffles, pair cycles, generator and global RNG states, epoch sums, history) is
    saved every `checkpoint_every` steps, and a saved state of the same key and plan is resumed from:
    `log` is first called again for every saved epoch (so a fresh logger holds them all), and on the
    CPU the result is identical to an uninterrupted run. The caller clears the checkpoint once its
    outputs are written. The head is returned in eval mode on `device`. Deterministic on the CPU for a
    fixed seed, whatever `num_workers`.

    With `ranks` of several processes (torchrun), each rank trains on its share of every step's triplets (see
    the module docstring); the history holds the global batch's values on every rank, and only rank 0 saves
    checkpoints (every rank resumes from them).
    """
    w = _check_weights(weights)
    if view not in EMBEDDED_VIEWS:
        raise PipelineError(f"embedding: view must be one of {', '.join(EMBEDDED_VIEWS)}, got {view!r}")
    if schedule not in SCHEDULES:
        raise PipelineError(f"embedding: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    needed = ["box", "fg", "bg"] if w["mask"] > 0 else [view]
    missing = [k for k in needed if k not in features]
    if missing:
        raise PipelineError(f"embedding: features lack the {', '.join(missing)} view(s) (expected keys box, fg, bg)")
    data = SampleBlocks(
        {k: features[k] for k in needed}, image_offsets, object_pairs, hier_pairs, block_rows=block_rows
    )
    n, in_dim, n_blocks = data.n, data.dim, len(data)
    n_obj, n_hier = data.object_pairs.count, data.hier_pairs.count
    if int(epochs) < 1 or int(batch_size) < 1:
        raise PipelineError(f"embedding: epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (math.isfinite(margin) and margin >= 0):
        raise PipelineError(f"embedding: margin must be >= 0, got {margin}")
    if int(checkpoint_every) < 1 or int(num_workers) < 0:
        raise PipelineError(
            f"embedding: checkpoint_every must be >= 1 and num_workers >= 0, got {checkpoint_every} and {num_workers}"
        )
    epochs, batch_size, checkpoint_every = int(epochs), int(batch_size), int(checkpoint_every)
    dev = torch.device(pick_device(device))

    for term, count in (("object", n_obj), ("hier", n_hier)):
        if w[term] > 0 and count == 0:
            warnings.warn(
                f"embedding: loss.{term} = {w[term]:g} but there are no {term} pairs; the {term} term contributes 0",
                stacklevel=2,
            )
    active = [t for t in TERMS if w[t] > 0]
    use_obj = w["object"] > 0 and n_obj > 0
    use_hier = w["hier"] > 0 and n_hier > 0
    if not (w["mask"] > 0 or use_obj or use_hier):
        raise PipelineError(f"embedding: nothing to train: the active term(s) {', '.join(active)} have no pairs")

    ranks = ranks or Ranks()
    rank, world = ranks.rank, ranks.world_size
    head = initial_head(in_dim, hidden, dim, geometry, c, seed=seed, init=init)
    head.to(dev).train()
    model = DistributedDataParallel(head) if world > 1 else head  # all-reduces the gradients of the shares
    generator = torch.Generator().manual_seed(seed)
    eval_index = np.arange(n_hier)
    if n_hier > max_eval_pairs:
        eval_index = np.sort(np.random.default_rng(seed).choice(n_hier, max_eval_pairs, replace=False))
    eval_pairs = data.hier_pairs.take(eval_index)

    sizes = [int(r) for r in data.block_sizes()]
    steps_per_epoch = sum(len(batch_sizes(r, batch_size)) for r in sizes)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    obj_sizes, hier_sizes = np.diff(data.object_pairs.ranges), np.diff(data.hier_pairs.ranges)
    planned = sum(
        b * (w["mask"] > 0) + min(b, int(obj_sizes[k])) * use_obj + min(b, int(hier_sizes[k])) * use_hier
        for k, rows in enumerate(sizes)
        for b in batch_sizes(rows, batch_size)
    )
    plan = {
        "n": n,
        "dim": in_dim,
        "bounds": data.bounds.tolist(),
        "pairs": [n_obj, n_hier],
        "batch_size": batch_size,
        "epochs": epochs,
        "seed": int(seed),
        "weights": w,
        "view": view,
        "init": init,
        "schedule": schedule,
    }

    history: list[dict[str, float]] = []
    step, position = 0, (0, 0, 0)  # the next step's (epoch, position in the epoch's block order, batch)
    cycle_block, cycles = -1, {"object": None, "hier": None}
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and not _compatible(state, plan):
        _log.warning("%s: checkpoint of another training plan (data or schedule); starting over", checkpoint.path)
        state = None
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        history, step, position = [dict(h) for h in state["history"]], int(state["step"]), tuple(state["position"])
        cycle_block = int(state["cycle_block"])
        cycles = {k: _Cycler.restore(v, generator) for k, v in state["cycles"].items()}
        _log.info("resumed from step %d of %d (epoch %d of %d)", step, total_steps, position[0] + 1, epochs)
        if log is not None:
            for e, metrics in enumerate(history):
                log(e, dict(metrics))

    start_epoch, start_pos, start_batch = position
    schedule = block_plan(n_blocks, seed, epochs, (start_epoch, start_pos))
    blocks = iter(block_loader(data, [b for _, _, b in schedule], num_workers)) if schedule else iter(())
    done = sum(h["triplets"] for h in history) + (state["triplets"] if state is not None else 0)
    bar = tqdm(
        total=planned * epochs,
        initial=done,
        unit="triplet",
        unit_scale=True,
        disable=not progress,
        desc="embed",
        dynamic_ncols=True,
    )
    zero = torch.zeros((), device=dev)
    block: Block | None = None
    try:
        for epoch in range(start_epoch, epochs):
            if state is not None and epoch == start_epoch:
                started = time.perf_counter() - float(state["epoch_seconds"])
                sums, total_sum, triplets = dict(state["sums"]), float(state["total_sum"]), int(state["triplets"])
                hinges = {k: list(v) for k, v in state["hinges"].items()}
            else:
                started = time.perf_counter()
                sums = dict.fromkeys(active, 0.0)
                total_sum, triplets = 0.0, 0
                hinges = {t: [0, 0] for t in active}  # per term: active triplets, triplets
            order = block_order(seed, epoch, n_blocks)
            for j in range(start_pos if epoch == start_epoch else 0, n_blocks):
                block = None  # released before the next one is read
                block = next(blocks)
                if block.index != int(order[j]):
                    raise PipelineError(f"embedding: block {block.index} served where block {order[j]} was due")
                if state is not None and (epoch, j) == (start_epoch, start_pos) and start_batch > 0:
                    perm, first = state["perm"], start_batch
                else:
                    perm, first = torch.randperm(block.rows, generator=generator), 0
                if block.index != cycle_block:  # a newly loaded block: its own pair cycles
                    cycle_block = block.index
                    cycles = {
                        "object": _Cycler(len(block.object_pairs), generator) if use_obj else None,
                        "hier": _Cycler(len(block.hier_pairs), generator) if use_hier else None,
                    }
                keys = object_pair_keys(block.object_pairs, block.rows) if use_obj else np.zeros(0, dtype=np.int64)
                views = block.views
                n_batches = len(batch_sizes(block.rows, batch_size))
                for s in range(first, n_batches):
                    idx = perm[s * batch_size : (s + 1) * batch_size]
                    chunks: dict[str, list[tuple[str, Tensor]]] = {}
                    if w["mask"] > 0:
                        chunks["mask"] = [("box", idx), ("fg", idx), ("bg", idx)]
                    if use_obj:
                        pairs = block.object_pairs[cycles["object"].take(len(idx))]
                        negatives = sample_object_negatives(pairs, block.offsets, keys, generator, same_image_negatives)
                        keep = negatives >= 0
                        rows = torch.from_numpy(np.stack([pairs[keep, 0], pairs[keep, 1], negatives[keep]]))
                        chunks["object"] = [(view, rows[0]), (view, rows[1]), (view, rows[2])]
                    if use_hier:
                        rows = torch.from_numpy(block.hier_pairs[cycles["hier"].take(len(idx))].T.copy())
                        chunks["hier"] = [(view, rows[0]), (view, rows[1])]
                    step_triplets = {term: len(parts[0][1]) for term, parts in chunks.items()}  # global batch's
                    triplets += sum(step_triplets.values())
                    if world > 1:  # this rank's share of every term's triplets
                        chunks = {t: [(v, i[rank::world]) for v, i in parts] for t, parts in chunks.items()}
                    flat = [views[view][i] for parts in chunks.values() for view, i in parts]
                    z = model(torch.cat(flat).to(dev).float()).split([len(t) for t in flat])
                    emb: dict[str, tuple[Tensor, ...]] = {}
                    pos = 0
                    for term, parts in chunks.items():
                        emb[term] = z[pos : pos + len(parts)]
                        pos += len(parts)

                    terms: dict[str, Tensor] = {}
                    counts: list[Tensor] = []
                    for term in active:
                        if term not in emb:
                            terms[term] = zero
                            counts += [zero, zero]
                            continue
                        if term == "hier":
                            h = hier_hinges(*emb[term], head.norm_distance, margin)
                        else:  # mask: anchor box, positive fg, negative bg; object: an object pair and a negative
                            h = triplet_hinges(*emb[term], head.distance, margin)
                        terms[term] = hinge_mean(h) if world == 1 else _share_of_mean(h, step_triplets[term], world)
                        counts += [(h.detach() > 0).sum().to(zero.dtype), zero + h.numel()]
                    total = sum(w[t] * terms[t] for t in active)
                    stacked = torch.stack([terms[t].detach() for t in active] + [total.detach(), *counts])
                    if world > 1:  # the global batch's terms (each rank holds world x its share) and counts
                        dist.all_reduce(stacked)
                        stacked[: len(active) + 1] /= world
                    stacked = stacked.tolist()
                    values, counted = stacked[: len(active) + 1], stacked[len(active) + 1 :]
                    for k, term in enumerate(active):
                        hinges[term][0] += int(counted[2 * k])
                        hinges[term][1] += int(counted[2 * k + 1])
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
                    bar.update(sum(len(parts[0][1]) for parts in chunks.values()))
                    if s % 20 == 0:
                        bar.set_postfix(epoch=epoch, loss=f"{values[-1]:.4f}", refresh=False)
                    if checkpoint is not None and ranks.is_main and step % checkpoint_every == 0:
                        after = (epoch, j, s + 1) if s + 1 < n_batches else (epoch, j + 1, 0)
                        checkpoint.save(
                            {
                                "format": TRAIN_STATE_FORMAT,
                                "plan": plan,
                                "step": step,
                                "position": after,
                                "perm": perm if after[2] > 0 else None,
                                "cycle_block": cycle_block,
                                "cycles": {k: (v.state() if v is not None else None) for k, v in cycles.items()},
                                "sums": dict(sums),
                                "total_sum": total_sum,
                                "hinges": {k: list(v) for k, v in hinges.items()},
                                "triplets": triplets,
                                "epoch_seconds": time.perf_counter() - started,
                                "history": [dict(h) for h in history],
                                "generator": generator.get_state(),
                                "rng": rng_state(),
                                "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                                "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(),
                            }
                        )

            metrics = {t: sums[t] / steps_per_epoch for t in active}
            metrics["total"] = total_sum / steps_per_epoch
            for term, (on, seen) in hinges.items():
                if seen:
                    metrics[f"active/{term}"] = on / seen
            if len(eval_pairs):
                head.eval()
                metrics.update(_d0_stats(head, _view_rows(data, block, view), eval_pairs, dev))
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
        del blocks  # stops the reader processes
    return head.eval(), history


def _share_of_mean(hinges: Tensor, n_global: int, world_size: int) -> Tensor:
    """This rank's part of a term's mean over the global batch, times `world_size`: DistributedDataParallel
    averages the ranks' gradients, so the result is the gradient of the global mean whatever the shares' sizes."""
    return torch.relu(hinges).sum() * (world_size / max(n_global, 1))


def _view_rows(data: SampleBlocks, block: Block | None, view: str) -> Callable[[np.ndarray], Tensor]:
    """`view` features of sorted rows: from `block` when it holds them all (the whole split is one block),
    else read from the split by slices of at most `block_rows` rows."""

    def rows(ids: np.ndarray) -> Tensor:
        if block is not None and ids.size and block.start <= ids[0] and ids[-1] < block.start + block.rows:
            return block.views[view][torch.from_numpy(ids - block.start)]
        return data.read_rows(view, ids)

    return rows
