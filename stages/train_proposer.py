"""train_proposer: the class-agnostic Mask R-CNN, trained on base-category annotations only.

With `proposer.weights` set, that local checkpoint is loaded (class-agnostic) instead of training.
Writes models/proposer.pt; training curves go to dvclive/train_proposer. The images listed in the
manifest's `proposer_excluded_image_ids` (the LVIS val images, which are COCO train2017 images too) are
left out of training.

Training saves a resumable state to checkpoints/train_proposer/ every `proposer.checkpoint_every` steps;
a rerun after a kill goes on from there (same final weights) when nothing that changes training did
(see `checkpoint_key`), and the checkpoint is removed once models/proposer.pt is written. dvclive: the
Live directory starts afresh (resume=False) and a resumed run first re-logs the saved steps (train_proposer
calls `log_step` for them), so the curves and the summary are those of an uninterrupted run; with
Live(resume=True) the steps logged between the last checkpoint and the kill would appear twice.

Under `torchrun --nproc_per_node N -m stages.train_proposer` (or with `dist.nproc: N`, which makes `dvc repro`
launch the stage that way, `pipeline.distributed.launch_ranks`) the ranks train one model with
DistributedDataParallel (gloo on the CPU, NCCL on GPUs; `pipeline/distributed.py`): `proposer.batch_size`
is the global batch, split across the ranks (it must be a multiple of N), so the schedule and the
learning rate do not depend on N. Rank 0 alone logs to dvclive, writes the checkpoints and
models/proposer.pt and prints the summary; a killed run restarted with the same command resumes from the
last checkpoint, as with one process. The other ranks leave once training is done.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin for 3,000 rounds (~30 us) before they sleep, not libgomp's default 300,000 (~3 ms, which
# takes a busy neighbour's core) nor OMP_WAIT_POLICY=PASSIVE's 0 (slower on idle cores): README "Training the
# proposer in 3 minutes". Only how threads wait changes, not the numbers. libgomp (torch's Linux wheels; other
# OpenMP runtimes ignore it) reads GOMP_SPINCOUNT once, when torch loads it, so it is set before the imports below
# and removed after them: the CPU ranks launch_ranks starts for dist.nproc share the cores and sleep at once
# (OMP_WAIT_POLICY=PASSIVE, pipeline.distributed). OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user wins.
_SHORT_SPIN = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if _SHORT_SPIN:
    os.environ["GOMP_SPINCOUNT"] = "3000"

from contextlib import nullcontext
from pathlib import Path

import torch
import typer
from dvclive import Live

from pipeline.config import Params
from pipeline.data.dataset import Manifest, read_manifest
from pipeline.device import numeric_context, pick_device
from pipeline.distributed import init_ranks, launch_ranks, main_goes_on, rank_device, shutdown
from pipeline.errors import PipelineError
from pipeline.models.inference import decoding_workers
from pipeline.models.proposer import build_model, load_checkpoint, save_checkpoint
from pipeline.models.proposer_train import train_proposer
from pipeline.stores.checkpoint import Checkpoint
from stages.common import MANIFEST, PROPOSER_CHECKPOINT, Timer, clean_errors, params, summary

if _SHORT_SPIN:  # read by libgomp when torch loaded it; not passed on to the processes this one starts
    os.environ.pop("GOMP_SPINCOUNT", None)

LIVE_DIR = "dvclive/train_proposer"
LOG_EVERY = 5  # steps between dvclive points


def checkpoint_key(p: Params, manifest: Manifest, device: str, world_size: int = 1) -> dict:
    """What a resumable training state depends on: the training params (not `checkpoint_every`), the seed,
    the training file and its images (the manifest's input digests), the excluded ids, the device type and
    the number of ranks (each rank's RoI sampler state is saved; one process's key is the same as before
    ranks existed). `num_workers` is not in it (the weights do not depend on it); `amp` only when not off."""
    cfg = p.proposer
    key = {
        "proposer": {
            "backbone": cfg.backbone,
            "image_size": cfg.image_size,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "roi_align_grad": cfg.roi_align_grad,
            "fpn_channels": cfg.fpn_channels,
            "rois_per_image": cfg.rois_per_image,
        },
        "seed": cfg.seed,
        "proposer_json": str(manifest.proposer_json),
        "image_root": str(manifest.proposer_images()),
        "files": dict(sorted(manifest.files.items())),
        "excluded": sorted(int(i) for i in manifest.proposer_excluded_image_ids),
        "device": str(torch.device(device).type),
        "numerics": numeric_context(device),
    }
    if cfg.amp != "off":
        key["proposer"]["amp"] = cfg.amp
    if world_size > 1:
        key["world_size"] = world_size
    return key


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    cfg = p.proposer
    manifest = read_manifest(MANIFEST)
    device = pick_device(p.device)
    if not cfg.weights and cfg.batch_size % p.dist.nproc:  # said once, before any rank starts
        raise PipelineError(
            f"proposer.batch_size {cfg.batch_size} is the global batch, split across dist.nproc = {p.dist.nproc} "
            f"ranks: it must be a multiple of {p.dist.nproc}"
        )
    if launch_ranks("stages.train_proposer", p.dist.nproc, device):
        return  # `dist.nproc` > 1: this process ran the stage as that many torchrun ranks
    ranks = init_ranks(device)
    device = rank_device(device, ranks)
    torch.manual_seed(cfg.seed)
    checkpoint: Checkpoint | None = None
    # dvclive on rank 0 only: the other ranks log nothing
    live_dir = Live(LIVE_DIR, save_dvc_exp=False, dvcyaml=None) if ranks.is_main else nullcontext()
    with live_dir as live:
        if cfg.weights:
            if not main_goes_on(ranks):
                return  # nothing to train: rank 0 alone loads the weights and writes them
            model = load_checkpoint(Path(cfg.weights), cfg.backbone, cfg.image_size)
            text = f"loaded {cfg.weights} (no training)"
            live.summary["steps"] = 0
        else:
            model = build_model(cfg.backbone, cfg.image_size, fpn_channels=cfg.fpn_channels)
            checkpoint = Checkpoint("train_proposer", checkpoint_key(p, manifest, device, ranks.world_size))
            history = train_proposer(
                model,
                Path(manifest.proposer_json),
                manifest.proposer_images(),
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=cfg.seed,
                device=device,
                log_step=_logger(live) if ranks.is_main else None,
                exclude_image_ids=manifest.proposer_excluded_image_ids,
                checkpoint=checkpoint,
                checkpoint_every=cfg.checkpoint_every,
                roi_align_grad=cfg.roi_align_grad,
                rois_per_image=cfg.rois_per_image,
                num_workers=decoding_workers(cfg.num_workers, device),
                amp=cfg.amp,
                ranks=ranks,
            )
            if not main_goes_on(ranks):
                return  # trained: rank 0 holds the same weights and writes them
            live.summary["steps"] = len(history)
            final = history[-1]["loss"] if history else float("nan")
            live.summary["final_loss"] = final
            live.summary["train_images"] = history.n_images
            live.summary["excluded_images"] = history.n_excluded
            text = (
                f"trained {cfg.backbone} FPN for {len(history)} steps on {device}"
                + (f" under {cfg.amp} autocast" if cfg.amp != "off" else "")
                + (f" with {ranks.world_size} ranks" if ranks.world_size > 1 else "")
                + (f" (resumed from step {history.resumed_from})" if history.resumed_from else "")
                + f", final loss {final:.3f}; {history.n_images} images, {history.n_excluded} excluded (LVIS val)"
            )
    save_checkpoint(model, PROPOSER_CHECKPOINT, cfg.backbone, cfg.image_size)
    if checkpoint is not None:
        checkpoint.clear()  # the weights are saved: nothing left to resume
    summary("train_proposer", text + f"; wrote {PROPOSER_CHECKPOINT}", timer)
    shutdown(ranks)  # rank 0 leaves the group last, once everything is written


def _logger(live: Live):
    def log_step(step: int, losses: dict[str, float]) -> None:
        if step % LOG_EVERY == 0:
            live.step = step  # the plots' x axis is the training step, not the count of logged points
            for name, value in losses.items():
                live.log_metric(f"train/{name}", value)
            live.next_step()

    return log_step


if __name__ == "__main__":
    typer.run(main)
