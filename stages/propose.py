"""propose: class-agnostic mask proposals for every image of a split -> data/<split>/proposals.zarr.

Also scores the proposals against the split's ground truth (class-agnostic mask recall at k and AP50,
for base and novel categories) into metrics/propose_<split>.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

from pipeline.config import as_dict
from pipeline.data.dataset import read_manifest
from pipeline.data.lvis_format import load_json
from pipeline.device import pick_device
from pipeline.proposals import propose_split
from pipeline.proposer import evaluate_proposals, load_checkpoint, propose
from pipeline.store import write_json, write_store
from stages.common import MANIFEST, PROPOSER_CHECKPOINT, Timer, clean_errors, params, split_dir, summary


@clean_errors
def main(
    split: str = typer.Option(..., help="train or val"),
    params_file: str = typer.Option("params.yaml", help="params file"),
) -> None:
    timer = Timer()
    p = params(params_file)
    cfg = p.propose
    manifest = read_manifest(MANIFEST)
    gt_path = manifest.split_json(split)
    gt = load_json(gt_path, "LVIS annotations")
    device = pick_device(p.device)
    model = load_checkpoint(
        PROPOSER_CHECKPOINT,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        max_proposals=cfg.max_proposals,
    ).to(device)
    images = sorted(gt["images"], key=lambda r: r["id"])
    result = propose_split(
        images,
        Path(manifest.image_root),
        lambda batch: propose(model, batch, device=device),
        batch_size=cfg.batch_size,
        mask_size=model.roi_heads.mask_roi_pool.output_size[0] * 2,
        on_missing_image=cfg.on_missing_image,
    )
    n_props = len(result.scores)
    n_empty = int(((result.image_offsets[1:] - result.image_offsets[:-1]) == 0).sum())
    attrs = {
        "split": split,
        "params": {"propose": as_dict(cfg), "device": device},
        "proposer_checkpoint": str(PROPOSER_CHECKPOINT),
        "proposer_digest": hashlib.sha256(PROPOSER_CHECKPOINT.read_bytes()).hexdigest()[:16],
        "annotations": str(gt_path),
        "mask_format": "uint8 probability x255, box-relative, paste into the box and threshold at 0.5",
        "counts": {
            "images": len(images),
            "proposals": n_props,
            "empty_images": n_empty,
            "skipped": len(result.skipped),
        },
        "skipped_image_ids": result.skipped,
    }
    out = split_dir(split) / "proposals.zarr"
    write_store(out, result.arrays(), attrs, kind="proposals")
    metrics = evaluate_proposals(
        result.per_image(),
        gt_path,
        [int(i) for i in result.image_ids],
        set(manifest.base_category_ids),
        k=cfg.max_proposals,
    )
    write_json(Path("metrics") / f"propose_{split}.json", metrics)
    rate = len(images) / max(timer.seconds, 1e-9)
    k = cfg.max_proposals
    recall = {group: metrics.get(f"recall@{k}/{group}", float("nan")) for group in ("base", "novel")}
    summary(
        "propose",
        f"{split}: {n_props} proposals on {len(images)} images ({n_empty} with none, {len(result.skipped)} skipped), "
        f"{rate:.1f} img/s on {device}; mask recall@{k} base {recall['base']:.3f} novel {recall['novel']:.3f}; "
        f"wrote {out}",
        timer,
    )


if __name__ == "__main__":
    typer.run(main)
