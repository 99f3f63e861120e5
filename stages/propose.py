"""propose: class-agnostic mask proposals for every image of a split -> data/<split>/proposals.zarr.

Also scores the proposals against the split's ground truth (class-agnostic mask recall at k and AP50,
for base and novel categories) into metrics/propose_<split>.json.

Under `torchrun --nproc_per_node N -m stages.propose --split S`, each rank proposes every N-th part of the
split (`pipeline/stores/parts.py`); rank 0 then assembles the parts into the store (the same bytes as one
process's) and alone writes the metrics and the summary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline.config import store_params
from pipeline.data.annotation_stream import load_image_records
from pipeline.data.dataset import read_manifest
from pipeline.device import numeric_context, pick_device
from pipeline.distributed import init_ranks, launch_ranks, main_first, main_goes_on, rank_device, shutdown
from pipeline.evaluation.proposal_metrics import evaluate_proposals
from pipeline.models.inference import decoding_workers
from pipeline.models.proposer import load_checkpoint, propose
from pipeline.stores.parts import IMAGES_PER_PART, ImageParts
from pipeline.stores.proposals import StoreProposals, proposal_columns, propose_parts
from pipeline.stores.store import file_digest, open_store, write_json
from stages.common import MANIFEST, PROPOSER_CHECKPOINT, Timer, clean_errors, params, split_dir, summary

log = logging.getLogger("propose")


@clean_errors
def main(
    split: str = typer.Option(..., help="train or val"),
    params_file: str = typer.Option("params.yaml", help="params file"),
    images_per_part: int = typer.Option(
        IMAGES_PER_PART, min=1, help="images per resumable part (the unit of work, memory and resume)"
    ),
) -> None:
    timer = Timer()
    p = params(params_file)
    cfg = p.propose
    device = pick_device(p.device)
    if launch_ranks("stages.propose", p.dist.nproc, device):
        return
    manifest = read_manifest(MANIFEST)
    gt_path = manifest.split_json(split)
    images = sorted(load_image_records(gt_path, "LVIS annotations"), key=lambda r: r["id"])  # not the annotations
    ranks = init_ranks(device)
    run_device = rank_device(device, ranks)
    model = load_checkpoint(
        PROPOSER_CHECKPOINT,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        max_proposals=cfg.max_proposals,
    ).to(run_device)
    mask_size = model.roi_heads.mask_roi_pool.output_size[0] * 2
    out = split_dir(split) / "proposals.zarr"
    proposer_digest = file_digest(PROPOSER_CHECKPOINT)
    key = {
        "split": split,
        "propose": store_params(cfg),
        "device": device,
        "numerics": numeric_context(device),
        "proposer_digest": proposer_digest,
        "annotations": manifest.files.get(str(gt_path), str(gt_path)),
        "image_root": manifest.image_root,
    }
    with main_first(ranks):  # rank 0 clears another run's parts before any rank writes
        parts = ImageParts(
            out,
            key,
            proposal_columns(mask_size),
            len(images),
            images_per_part=images_per_part,
            is_main=ranks.is_main,
        )
    if parts.n_done and ranks.is_main:
        print(f"[propose] resuming: {parts.n_done} of {len(parts.ranges)} parts already done", flush=True)
    propose_parts(
        parts,
        images,
        Path(manifest.image_root),
        lambda batch: propose(model, batch, device=run_device, amp=cfg.amp),
        batch_size=cfg.batch_size,
        mask_size=mask_size,
        on_missing_image=cfg.on_missing_image,
        num_workers=decoding_workers(cfg.num_workers, run_device),
        pin_memory=run_device.startswith("cuda"),
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    if not main_goes_on(ranks):
        return
    skipped = [i for meta in parts.metas() for i in meta["skipped"]]
    if skipped:
        log.warning("skipped %d missing or unreadable images (first id %d)", len(skipped), skipped[0])
    counts = parts.row_counts()
    n_props, n_empty = int(counts.sum()), int((counts == 0).sum())
    attrs = {
        "split": split,
        "params": {"propose": store_params(cfg), "device": device},
        "proposer_checkpoint": str(PROPOSER_CHECKPOINT),
        "proposer_digest": proposer_digest,
        "annotations": str(gt_path),
        "mask_format": "uint8 probability x255, box-relative, paste into the box and threshold at 0.5",
        "counts": {"images": len(images), "proposals": n_props, "empty_images": n_empty, "skipped": len(skipped)},
        "skipped_image_ids": skipped,
    }
    parts.assemble(attrs, kind="proposals")
    store = open_store(out, "proposals")
    metrics = evaluate_proposals(
        StoreProposals(store),
        gt_path,
        [int(i) for i in store["image_ids"][...]],
        set(manifest.base_category_ids),
        k=cfg.max_proposals,
    )
    write_json(Path("metrics") / f"propose_{split}.json", metrics)
    parts.remove()  # only now: a kill during the metrics keeps every part for the rerun
    rate = len(images) / max(timer.seconds, 1e-9)
    k = cfg.max_proposals
    recall = {group: metrics.get(f"recall@{k}/{group}", float("nan")) for group in ("base", "novel")}
    summary(
        "propose",
        f"{split}: {n_props} proposals on {len(images)} images ({n_empty} with none, {len(skipped)} skipped), "
        f"{rate:.1f} img/s on {device}; mask recall@{k} base {recall['base']:.3f} novel {recall['novel']:.3f}; "
        f"wrote {out}",
        timer,
    )
    shutdown(ranks)


if __name__ == "__main__":
    typer.run(main)
