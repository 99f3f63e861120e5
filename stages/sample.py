"""sample: three crops of every proposal pooled by a frozen backbone, and the mask relations of each image.

Reads data/<split>/proposals.zarr, writes data/<split>/samples.zarr (features/{box,fg,bg}, pairs/object,
pairs/hier, image_offsets), stamped with the fingerprint of the proposals store it came from.

Under `torchrun --nproc_per_node N -m stages.sample --split S`, each rank samples every N-th part of the
split; rank 0 assembles the store (the same bytes as one process's) and writes the summary.
"""

from __future__ import annotations

import typer

from pipeline.config import store_params
from pipeline.data.dataset import read_manifest
from pipeline.device import numeric_context, pick_device
from pipeline.distributed import init_ranks, launch_ranks, main_first, main_goes_on, rank_device, shutdown
from pipeline.models.features import build_backbone
from pipeline.models.inference import decoding_workers
from pipeline.stores.parts import IMAGES_PER_PART, ImageParts
from pipeline.stores.sampling import PAIR_COLUMNS, sample_columns, sample_parts
from pipeline.stores.store import open_store, read_array
from stages.common import MANIFEST, PROPOSER_CHECKPOINT, Timer, clean_errors, image_loader, params, split_dir, summary


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
    cfg = p.sample
    device = pick_device(p.device)
    if launch_ranks("stages.sample", p.dist.nproc, device):
        return
    manifest = read_manifest(MANIFEST)
    source = split_dir(split) / "proposals.zarr"
    proposals = open_store(source, "proposals")
    image_ids = read_array(proposals, "image_ids")
    n = int(proposals["image_offsets"][-1])
    ranks = init_ranks(device)
    run_device = rank_device(device, ranks)
    backbone = build_backbone(cfg.backbone, cfg.backbone_init, seed=p.seed, proposer_checkpoint=PROPOSER_CHECKPOINT)
    out = split_dir(split) / "samples.zarr"
    key = {
        "split": split,
        "sample": store_params(cfg),
        "seed": p.seed,
        "device": device,
        "numerics": numeric_context(device),
        "image_root": manifest.image_root,
        "proposals": proposals.attrs["fingerprint"],
        "backbone": backbone.init,
        "proposer": proposals.attrs.get("proposer_digest"),
    }
    with main_first(ranks):  # rank 0 clears another run's parts before any rank writes
        parts = ImageParts(
            out,
            key,
            sample_columns(backbone.dim, cfg.dtype),
            len(image_ids),
            images_per_part=images_per_part,
            index_columns=PAIR_COLUMNS,
            is_main=ranks.is_main,
        )
    if parts.n_done and ranks.is_main:
        print(f"[sample] resuming: {parts.n_done} of {len(parts.ranges)} parts already done", flush=True)
    sample_parts(
        parts,
        proposals,
        image_loader(manifest, split, image_ids),
        backbone,
        dtype=cfg.dtype,
        crop_size=cfg.crop_size,
        object_iou=cfg.object_iou,
        hier_containment=cfg.hier_containment,
        hier_exclude_objects=cfg.hier_exclude_objects,
        relation_max_side=cfg.relation_max_side,
        batch_size=cfg.batch_size,
        device=run_device,
        num_workers=decoding_workers(cfg.num_workers, run_device),
        amp=cfg.amp,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    if not main_goes_on(ranks):
        return
    counts = {
        "images": len(image_ids),
        "proposals": n,
        "object_pairs": parts.n_rows("pairs/object"),
        "hier_pairs": parts.n_rows("pairs/hier"),
    }
    attrs = {
        "split": split,
        "params": {"sample": store_params(cfg), "seed": p.seed, "device": device},
        "backbone": backbone.init,
        "feature_dim": int(backbone.dim),
        "feature_dtype": cfg.dtype,
        "source": str(source),
        "source_fingerprint": proposals.attrs["fingerprint"],
        "counts": counts,
    }
    parts.assemble(attrs, kind="samples")
    parts.remove()
    summary(
        "sample",
        f"{split}: {n} proposals x 3 views ({cfg.backbone}, {attrs['backbone']}), {counts['object_pairs']} object "
        f"and {counts['hier_pairs']} hier pairs, {n / max(timer.seconds, 1e-9):.1f} proposals/s on {device}; "
        f"wrote {out}",
        timer,
    )
    shutdown(ranks)


if __name__ == "__main__":
    typer.run(main)
