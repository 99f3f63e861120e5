"""train_proposer: the class-agnostic Mask R-CNN, trained on base-category annotations only.

With `proposer.weights` set, that local checkpoint is loaded (class-agnostic) instead of training.
Writes models/proposer.pt; training curves go to dvclive/train_proposer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from dvclive import Live

from pipeline.data.dataset import read_manifest
from pipeline.device import pick_device
from pipeline.proposer import build_model, load_checkpoint, save_checkpoint, train_proposer
from stages.common import MANIFEST, PROPOSER_CHECKPOINT, Timer, clean_errors, params, summary

LIVE_DIR = "dvclive/train_proposer"
LOG_EVERY = 5  # steps between dvclive points


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    cfg = p.proposer
    manifest = read_manifest(MANIFEST)
    device = pick_device(p.device)
    torch.manual_seed(p.seed)
    with Live(LIVE_DIR, save_dvc_exp=False, dvcyaml=None) as live:
        if cfg.weights:
            model = load_checkpoint(Path(cfg.weights), cfg.backbone, cfg.image_size)
            text = f"loaded {cfg.weights} (no training)"
            live.summary["steps"] = 0
        else:
            model = build_model(cfg.backbone, cfg.image_size)

            def log_step(step: int, losses: dict[str, float]) -> None:
                if step % LOG_EVERY == 0:
                    live.step = step  # the plots' x axis is the training step, not the count of logged points
                    for name, value in losses.items():
                        live.log_metric(f"train/{name}", value)
                    live.next_step()

            history = train_proposer(
                model,
                Path(manifest.proposer_json),
                Path(manifest.image_root),
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=p.seed,
                device=device,
                log_step=log_step,
            )
            live.summary["steps"] = len(history)
            final = history[-1]["loss"] if history else float("nan")
            live.summary["final_loss"] = final
            text = f"trained {cfg.backbone} FPN for {len(history)} steps on {device}, final loss {final:.3f}"
        live.summary["train_seconds"] = round(timer.seconds, 1)
    save_checkpoint(model, PROPOSER_CHECKPOINT, cfg.backbone, cfg.image_size)
    summary("train_proposer", text + f"; wrote {PROPOSER_CHECKPOINT}", timer)


if __name__ == "__main__":
    typer.run(main)
