"""Training the class-agnostic Mask R-CNN of `pipeline.models.proposer`: one process or DistributedDataParallel ranks.

SGD (momentum 0.9, weight decay 1e-4), gradients clipped to norm 10, linear warm-up from lr/1000 over
min(200, 10 % of the steps), then cosine decay to 0; random horizontal flips (p = 0.5) and a random
permutation of the colour channels (so that objectness is not learnt as "one of the base categories'
colours"); the seed fixes the initial RNG state, the batch order, the flips and the permutations, so a CPU
run is reproducible. Images are decoded in `num_workers` DataLoader processes when asked (pinned on CUDA; the
augmentations are still drawn here, so the weights do not depend on the number of workers), and the forward
pass can run under bf16 / fp16 autocast (`amp`; fp16 with a gradient scaler), which changes the weights. With a
`pipeline.stores.checkpoint.Checkpoint` the whole training state is saved every `checkpoint_every` steps and
resumed after a kill, bit for bit on the CPU; `_EpochBatches` reproduces DataLoader(shuffle=True)'s batch order
so that an epoch can start at any batch. Images listed in
`exclude_image_ids` (the LVIS val images) are never trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.models.detection import MaskRCNN
from tqdm import tqdm

from pipeline.data.proposer_data import CocoInstances, _collate, _hflip
from pipeline.device import pick_device
from pipeline.distributed import Ranks, all_gather, main_first
from pipeline.errors import PipelineError
from pipeline.models.inference import AMP_DTYPES, PREFETCH_FACTOR, autocast
from pipeline.models.roi_align import SparseGradRoIAlign
from pipeline.stores.checkpoint import Checkpoint, rng_state, set_rng_state

GRAD_CLIP_NORM = 10.0  # a randomly initialised detector's first steps can blow up without it
_RANK_SEED_STRIDE = 1_000_003  # rank r > 0 seeds its RoI samplers with seed + r * this (rank 0: seed)

log = logging.getLogger(__name__)


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up from peak/1000 over min(200, 10 % of the steps), then cosine decay to 0."""
    warmup = max(1, min(200, total // 10))
    if step < warmup:
        return peak * (0.001 + (1 - 0.001) * step / warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def _share(m: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's images [lo, hi) of a global batch of `m`: contiguous, sizes differing by at most one (the
    first ranks take the extra ones; a rank's share is empty only when m < world_size)."""
    q, r = divmod(m, world_size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


class _EpochBatches(torch.utils.data.Sampler):
    """The batches of `DataLoader(shuffle=True, generator=g)`, reproduced draw for draw, that can start mid-epoch.

    Per epoch, torch's RandomSampler draws `randperm(n, generator=g)` and, once exhausted, one more
    `randperm(n)` that it throws away (its tail for `num_samples % n`); BatchSampler cuts the first
    permutation into consecutive batches. Both draws are made here when the epoch's iteration starts, so
    the generator's state after them is the next epoch's start. The DataLoader itself draws one int64
    (the workers' base seed) from `g` before that, when it is iterated. Setting `skip` makes the next
    epoch start at its `skip`-th batch: the same permutation, without loading the skipped images.

    With several ranks each one yields its `_share` of every global batch (every rank draws the same
    permutation), or, where that share is empty, the global batch's first image as a placeholder (the
    training loop gives its loss the weight 0).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world_size = rank, world_size
        self.skip = 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        torch.randperm(self.n, generator=self.generator)  # RandomSampler's empty tail draw
        skip, self.skip = self.skip, 0
        for start in range(skip * self.batch_size, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            lo, hi = _share(len(batch), self.rank, self.world_size)
            yield batch[lo:hi] if hi > lo else batch[:1]


_RESUME_KEYS = {"model", "optimizer", "step", "total", "n_images", "history", "rng", "flip_gen", "epoch_start"}
ROI_ALIGN_GRADS = ("sparse", "torchvision")


class TrainHistory(list):
    """What `train_proposer` returns: one dict of floats per step (all steps, resumed or not), and
    `resumed_from` (the step a checkpoint let it start at, 0 for a fresh run), `n_images` (training
    images) and `n_excluded` (images of the file left out by `exclude_image_ids`)."""

    resumed_from: int = 0
    n_images: int = 0
    n_excluded: int = 0


def _set_roi_align_grad(model: MaskRCNN, sparse: bool) -> None:
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        if isinstance(pool, SparseGradRoIAlign):
            pool.sparse_grad = sparse


def train_proposer(
    model: MaskRCNN,
    coco_json: Path,
    image_root: Path,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    label_map: dict[int, int] | None = None,
    exclude_image_ids: Iterable[int] = (),
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 100,
    roi_align_grad: str = "sparse",
    rois_per_image: int | None = None,
    num_workers: int = 0,
    amp: str = "off",
    ranks: Ranks = Ranks(),
) -> TrainHistory:
    """Train `model` in place on the instances of `coco_json`; returns one dict of floats per step.

    Each dict holds torchvision's losses (loss_classifier, loss_box_reg, loss_mask, loss_objectness,
    loss_rpn_box_reg), their sum `loss` and the step's `lr`. `log_step(step, that dict)` is called
    once for every step, in order, 0 to the last (after a resume: first for the saved steps, at once).
    Seeds torch's global RNG with `seed` (the RoI samplers draw from it). Images whose id is in
    `exclude_image_ids` are never trained on. `roi_align_grad`: `sparse` (RoIAlign's CPU backward as one
    sparse matrix product, `pipeline.models.roi_align`) or `torchvision` (its own kernel: the same gradient up to
    the order of float additions, several times slower). `rois_per_image`: the RoIs the box head samples per
    image (at most a quarter positive, the mask head's), None for the model's own (`build_model`: 64 below
    512 px, else 512). `num_workers`: DataLoader processes decoding the images ahead (`PREFETCH_FACTOR`
    batches each, pinned on CUDA; 0 in this process), the same weights whatever the number. `amp`: `off`,
    `bf16` or `fp16` autocast of the forward pass (losses and the optimizer stay float32; fp16 scales the loss
    with torch's GradScaler, whose state the checkpoint keeps).

    With `checkpoint`, the full training state (weights, optimizer, step, history, every RNG: torch's
    global and CUDA ones, the batch order's and the augmentations' generators) is saved every
    `checkpoint_every` steps, and a saved state of the same key is resumed from: the run then ends with
    the same weights as an uninterrupted one (bit for bit on the CPU). The caller clears the checkpoint
    once it has saved the model. The key must cover everything that changes training (params, seed,
    inputs, excluded ids, device type, number of ranks); the step count and the number of images are
    checked here too.

    Several ranks (`ranks`, from `pipeline.distributed.init_ranks` under torchrun): DistributedDataParallel
    over the process group (gloo on the CPU, NCCL on GPUs). `batch_size` is the global batch, so the
    schedule, the learning rate and each image's augmentation do not depend on the number of ranks: every
    rank draws the same batch order and augmentations and trains on its `_share` of each batch; its loss is
    weighted by its share of the batch (DDP averages the gradients over ranks, so the sum is the mean over
    the batch's images even when the last batch of an epoch does not split evenly), and the logged losses
    are the batch's (all-reduced). Batch norm statistics are per rank (no SyncBatchNorm on the CPU). Rank 0
    alone writes the checkpoint, with every rank's RNG state; every rank resumes from it.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise PipelineError(
            f"proposer training needs epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})"
        )
    if checkpoint is not None and checkpoint_every < 1:
        raise PipelineError(f"proposer checkpoint_every must be at least 1, got {checkpoint_every}")
    if roi_align_grad not in ROI_ALIGN_GRADS:
        raise PipelineError(
            f"proposer roi_align_grad must be one of {', '.join(ROI_ALIGN_GRADS)}, got {roi_align_grad!r}"
        )
    if rois_per_image is not None and rois_per_image < 1:
        raise PipelineError(f"proposer rois_per_image must be at least 1, got {rois_per_image}")
    if num_workers < 0:
        raise PipelineError(f"proposer num_workers must be at least 0, got {num_workers}")
    if amp not in AMP_DTYPES:
        raise PipelineError(f"proposer amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    world = ranks.world_size
    if batch_size % world:
        raise PipelineError(
            f"proposer.batch_size {batch_size} is the global batch, split across the {world} ranks: "
            f"it must be a multiple of {world}"
        )
    device = pick_device(device)
    dataset = CocoInstances(
        coco_json, image_root, skip_empty=True, label_map=label_map, exclude_image_ids=exclude_image_ids
    )
    if len(dataset) == 0:
        raise PipelineError(f"{coco_json}: no image with a usable annotation to train the proposer on")
    torch.manual_seed(seed)
    if ranks.rank:
        torch.manual_seed(seed + _RANK_SEED_STRIDE * ranks.rank)  # each rank's own RoI samples
    shuffle_gen = torch.Generator().manual_seed(seed)
    flip_gen = torch.Generator().manual_seed(seed + 1)
    n = len(dataset)
    batches = _EpochBatches(n, batch_size, shuffle_gen, ranks.rank, world)
    # generator=shuffle_gen: the loader draws its base seed from it, as with shuffle=True (same order)
    # the sampler and the augmentations run in this process: workers only decode, the batches are the same
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        generator=shuffle_gen,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=PREFETCH_FACTOR if num_workers else None,
    )
    scaler = torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None
    autocast(device, amp)  # a dtype this torch build cannot autocast on this device fails here, before any step
    model.to(device).train()
    if rois_per_image is not None:
        model.roi_heads.fg_bg_sampler.batch_size_per_image = rois_per_image
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    per_epoch = len(batches)
    total = epochs * per_epoch
    history = TrainHistory()
    history.n_images, history.n_excluded = n, dataset.n_excluded
    step = 0
    epoch_start = shuffle_gen.get_state()  # the batch order's generator when the current epoch began
    state = None
    if checkpoint is not None:
        with main_first(ranks):  # rank 0 removes a checkpoint of another key before the others look
            state = checkpoint.load()
    if state is not None and not (
        state.keys() >= _RESUME_KEYS
        and state["total"] == total
        and state["n_images"] == n
        and (world == 1 or len(state.get("rank_rng", ())) == world)
        and (scaler is None or "scaler" in state)
    ):
        log.warning("%s: checkpoint of another schedule, data set or format; starting from scratch", checkpoint.path)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        history.extend(state["history"])
        set_rng_state(state["rank_rng"][ranks.rank] if world > 1 else state["rng"])
        flip_gen.set_state(state["flip_gen"])
        epoch_start = state["epoch_start"]
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        history.resumed_from = step
        log.info("%s: resumed from step %d of %d", checkpoint.path, step, total)
        if log_step is not None:
            for done, record in enumerate(history):
                log_step(done, record)
    if len(set(all_gather(step, ranks))) > 1:
        raise PipelineError("proposer training: the ranks found different checkpoints; delete checkpoints/ and rerun")
    net = model
    if world > 1:
        index = torch.device(device).index
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if index is None else [index])
    _set_roi_align_grad(model, roi_align_grad == "sparse")
    first_epoch, batches.skip = divmod(step, per_epoch)
    bar = tqdm(
        total=total,
        initial=step,
        desc="train proposer",
        unit="step",
        disable=not (progress and ranks.is_main),
        dynamic_ncols=True,
    )
    try:
        for epoch in range(first_epoch, epochs):
            shuffle_gen.set_state(epoch_start)
            for images, targets in loader:
                m = min(batch_size, n - (step - epoch * per_epoch) * batch_size)  # the global batch's images
                lo, hi = _share(m, ranks.rank, world)
                # every rank draws the whole batch's augmentations: an image's do not depend on the ranks
                flips = (torch.rand(m, generator=flip_gen) < 0.5).tolist()
                # colour is what tells base categories apart, not what makes an object: permute the channels
                orders = [torch.randperm(3, generator=flip_gen) for _ in range(m)]
                if hi == lo:  # no image of this batch for this rank: a placeholder whose loss weighs nothing
                    lo, hi, weight = 0, 1, 0.0
                else:
                    weight = world * (hi - lo) / m  # DDP averages over ranks: the sum is the batch's mean
                # to the device first (from pinned memory with workers on CUDA), then flip and permute there:
                # exact data movement, the same values wherever it runs
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [
                    {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                    for t in targets
                ]
                pairs = [
                    (_hflip(im, t) if flip else (im, t))
                    for im, t, flip in zip(images, targets, flips[lo:hi], strict=True)
                ]
                pairs = [(im[order], t) for (im, t), order in zip(pairs, orders[lo:hi], strict=True)]
                images, targets = [im for im, _ in pairs], [t for _, t in pairs]
                step_lr = _lr_at(step, total, lr)
                for group in optimizer.param_groups:
                    group["lr"] = step_lr
                with autocast(device, amp):
                    losses = {k: v.float() for k, v in net(images, targets).items()}
                loss = sum(losses.values())
                if world == 1:
                    record = {k: float(v.detach()) for k, v in losses.items()}
                    record["loss"] = float(loss.detach())
                else:  # the batch's losses: each rank's, weighted by its share
                    names = [*losses, "loss"]
                    values = torch.tensor([float(v.detach()) for v in [*losses.values(), loss]], dtype=torch.float64)
                    values *= weight / world
                    dist.all_reduce(values)
                    record = dict(zip(names, values.tolist(), strict=True))
                if not math.isfinite(record["loss"]):
                    parts = ", ".join(f"{k}={v:.4g}" for k, v in record.items())
                    raise PipelineError(
                        f"proposer training diverged at step {step} (epoch {epoch}): {parts}; try a lower lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                weighted = loss if weight == 1.0 else loss * weight
                if scaler is None:
                    weighted.backward()
                    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
                    optimizer.step()
                else:  # fp16: scaled loss; unscaled gradients clipped; a step with inf/NaN gradients is skipped
                    scaler.scale(weighted).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
                    scaler.step(optimizer)
                    scaler.update()
                record["lr"] = step_lr
                history.append(record)
                if log_step is not None:
                    log_step(step, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{step_lr:.2g}", refresh=False)
                bar.update(1)
                step += 1
                if checkpoint is not None and step % checkpoint_every == 0 and step < total:
                    rngs = all_gather(rng_state(), ranks)  # every rank's RoI sampler state
                    if ranks.is_main:
                        # the epoch the next step belongs to: this one, or (after its last batch) the next, whose
                        # start is the generator's state now (the sampler made all of its draws at the start)
                        next_start = shuffle_gen.get_state() if step % per_epoch == 0 else epoch_start
                        checkpoint.save(
                            {
                                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                "optimizer": optimizer.state_dict(),
                                "step": step,
                                "total": total,
                                "n_images": n,
                                "history": list(history),
                                "rng": rngs[0],
                                **({"rank_rng": rngs} if world > 1 else {}),
                                "flip_gen": flip_gen.get_state(),
                                "epoch_start": next_start,
                                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                            }
                        )
            epoch_start = shuffle_gen.get_state()
    finally:
        bar.close()
        _set_roi_align_grad(model, False)
    model.eval()
    return history
