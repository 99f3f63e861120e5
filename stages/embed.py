"""embed: train the embedding head on the train split's samples (no labels), then embed every val proposal.

Reads data/{train,val}/samples.zarr (and the proposals stores, to check the samples were made from them);
writes models/embedder.pt and data/val/embeddings.zarr; per-epoch loss terms and the mean distance to the
origin of parents and children go to dvclive/embed.
"""

from __future__ import annotations

import typer
from dvclive import Live

from pipeline.config import as_dict
from pipeline.device import pick_device
from pipeline.embedding import embed_features, save_head, train_embedder
from pipeline.sampling import VIEWS
from pipeline.store import check_source, open_store, read_array, write_store
from stages.common import EMBEDDER_CHECKPOINT, Timer, clean_errors, params, split_dir, summary

LIVE_DIR = "dvclive/embed"
TRAIN, EVAL = "train", "val"


def open_samples(split: str):
    """The samples store of `split`, checked against the proposals store it must have been made from."""
    path, source_path = split_dir(split) / "samples.zarr", split_dir(split) / "proposals.zarr"
    samples = open_store(path, "samples")
    check_source(samples, open_store(source_path, "proposals"), path, source_path)
    return samples


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    cfg, loss = p.embed, p.loss
    device = pick_device(p.device)
    train = open_samples(TRAIN)
    val = open_samples(EVAL)
    weights = {"mask": loss.mask, "object": loss.object, "hier": loss.hier}
    with Live(LIVE_DIR, save_dvc_exp=False, dvcyaml=None) as live:

        def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                if name not in ("lr", "triplets", "seconds"):
                    live.log_metric(f"train/{name}", value)
            live.next_step()

        head, history = train_embedder(
            {view: read_array(train, f"features/{view}") for view in VIEWS},
            read_array(train, "image_offsets"),
            read_array(train, "pairs/object"),
            read_array(train, "pairs/hier"),
            hidden=[cfg.hidden],
            dim=cfg.dim,
            geometry=cfg.geometry,
            c=cfg.curvature,
            margin=loss.margin,
            weights=weights,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=device,
            log=log_epoch,
        )
        triplets = sum(h["triplets"] for h in history)
        train_seconds = sum(h["seconds"] for h in history)
        live.summary.update({k: v for k, v in history[-1].items() if k not in ("lr", "seconds")})
        live.summary["triplets_per_second"] = triplets / max(train_seconds, 1e-9)
    meta = {"params": {"embed": as_dict(cfg), "loss": as_dict(loss)}, "history": history}
    save_head(head, EMBEDDER_CHECKPOINT, meta)
    embeddings = embed_features(head, read_array(val, "features/box"), device=device)
    attrs = {
        "split": EVAL,
        "geometry": cfg.geometry,
        "curvature": cfg.curvature,
        "dim": cfg.dim,
        "params": meta["params"],
        "source": str(split_dir(EVAL) / "samples.zarr"),
        "source_fingerprint": val.attrs["fingerprint"],
        "counts": {"proposals": len(embeddings), "train_proposals": int(train["features/box"].shape[0])},
    }
    out = split_dir(EVAL) / "embeddings.zarr"
    write_store(out, {"embeddings": embeddings, "image_offsets": read_array(val, "image_offsets")}, attrs, "embeddings")
    final = ", ".join(f"{t} {history[-1][t]:.4f}" for t in ("mask", "object", "hier") if t in history[-1])
    summary(
        "embed",
        f"{cfg.geometry} d={cfg.dim}, {len(history)} epochs, {triplets:.0f} triplets at "
        f"{triplets / max(train_seconds, 1e-9):.0f}/s on {device}; final {final}; "
        f"{len(embeddings)} {EVAL} embeddings -> {out}",
        timer,
    )


if __name__ == "__main__":
    typer.run(main)
