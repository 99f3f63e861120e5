"""supervised: the fully supervised Mask R-CNN of the paper's Table 1 (every train category label), scored on val.

Same architecture, training schedule and image size as the proposer (params `proposer`), but one class per
category; writes models/supervised.pt, metrics/supervised.json and metrics/detections_supervised.json.
Not part of `dvc repro`'s default DAG (it would double the run time): `dvc repro baselines/dvc.yaml`, or
`make tables`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from pipeline.data.annotation_stream import top_level_value
from pipeline.data.dataset import read_manifest
from pipeline.data.lvis_format import image_path, load_image
from pipeline.device import pick_device
from pipeline.evaluation.lvis_eval import load_lvis
from pipeline.models.inference import decoding_workers
from pipeline.models.proposer import build_model, propose, save_checkpoint
from pipeline.models.proposer_train import train_proposer
from pipeline.models.supervised import SCORE_THRESH, category_labels, evaluate_detector
from pipeline.stores.store import write_json
from stages.common import MANIFEST, Timer, clean_errors, params, summary

CHECKPOINT = Path("models/supervised.pt")
METRICS = Path("metrics/supervised.json")
DETECTIONS = Path("metrics/detections_supervised.json")


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    cfg = p.proposer
    manifest = read_manifest(MANIFEST)
    device = pick_device(p.device)
    train_json = Path(manifest.train_json)
    label_map = category_labels(top_level_value(train_json, "LVIS annotations", "categories"))
    torch.manual_seed(p.seed)
    model = build_model(
        cfg.backbone,
        cfg.image_size,
        num_classes=len(label_map) + 1,
        score_thresh=SCORE_THRESH,
        nms_thresh=p.propose.nms_thresh,
        max_proposals=p.evaluate.max_dets,
        fpn_channels=cfg.fpn_channels,
    )
    history = train_proposer(
        model,
        train_json,
        Path(manifest.image_root),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=p.seed,
        device=device,
        label_map=label_map,
        roi_align_grad=cfg.roi_align_grad,
        rois_per_image=cfg.rois_per_image,
        num_workers=decoding_workers(cfg.num_workers, device),
        amp=cfg.amp,
    )
    save_checkpoint(model, CHECKPOINT, cfg.backbone, cfg.image_size)
    gt = load_lvis(manifest.split_json("val"))
    images = sorted(gt.dataset["images"], key=lambda r: r["id"])
    root = Path(manifest.image_root)
    metrics, detections = evaluate_detector(
        gt,
        images,
        lambda record: load_image(image_path(record, root)),
        lambda batch: propose(model, batch, device=device),
        label_map,
        batch_size=p.propose.batch_size,
        max_dets=p.evaluate.max_dets,
        backend=p.evaluate.backend,
    )
    metrics["train"] = {"steps": len(history), "final_loss": history[-1]["loss"] if history else None}
    write_json(METRICS, metrics)
    write_json(DETECTIONS, detections)
    ap = metrics["supervised"]
    summary(
        "supervised",
        f"Mask R-CNN with {len(label_map)} classes, {len(history)} steps on {device}; val AP {ap['AP']:.3f}, "
        f"APr {ap['APr'] if ap['APr'] is None else round(ap['APr'], 3)}, {len(detections)} detections; wrote {METRICS}",
        timer,
    )


if __name__ == "__main__":
    typer.run(main)
