"""embed: train the embedding head on the train split's samples (no labels), then embed every val proposal.

Reads data/{train,val}/samples.zarr (and the proposals stores, to check the samples were made from them);
writes models/embedder.pt and data/val/embeddings.zarr; per-epoch loss terms and the mean distance to the
origin of parents and children, and the share of active triplets of each term, go to dvclive/embed.

Both splits are read by blocks, never whole: training streams the train store by blocks of whole images
(`embed.num_workers` reader processes), and the val embeddings are written batch by batch into the store.
Training checkpoints every `embed.checkpoint_every` steps under checkpoints/embed/ (keyed by the embed and
loss params and the train store's fingerprint); a rerun after a kill resumes from there ("resumed from step
N") and ends with the same head; the checkpoint is removed once the outputs are written. On a resume the
saved epochs are logged again into a fresh dvclive run (rather than `Live(resume=True)`, which would keep
twice the epochs logged between the last checkpoint and the kill). Neither models/embedder.pt nor the dvclive
metrics hold run times (the rate is printed in the summary line only), so the same inputs and params give
the same bytes and the same dvc.lock.

With `dist.nproc` > 1 (or under `torchrun --nproc_per_node N -m stages.embed`), the head trains with
DistributedDataParallel: the global batch stays `embed.batch_size`, split across the ranks
(`pipeline/models/embedding_train.py`), so the learning rate is unchanged; rank 0 alone logs, checkpoints and writes
the head and the val embeddings.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import typer
from dvclive import Live

from pipeline.config import Embed, Params, as_dict, speed_only
from pipeline.device import numeric_context, pick_device
from pipeline.distributed import Ranks, init_ranks, launch_ranks, main_goes_on, rank_device, shutdown
from pipeline.models.embedding import embed_batches, geometry_margin, save_head
from pipeline.models.embedding_train import train_embedder
from pipeline.stores.checkpoint import Checkpoint
from pipeline.stores.sampling import VIEWS
from pipeline.stores.store import StoreWriter, atomic_path, check_source, open_store, read_array, store_array
from stages.common import EMBEDDER_CHECKPOINT, Timer, clean_errors, params, split_dir, summary

LIVE_DIR = "dvclive/embed"
TRAIN, EVAL = "train", "val"
RUN_ONLY = speed_only(Embed)  # num_workers, checkpoint_every: how a run goes, not what it makes


def open_samples(split: str):
    """The samples store of `split`, checked against the proposals store it must have been made from."""
    path, source_path = split_dir(split) / "samples.zarr", split_dir(split) / "proposals.zarr"
    samples = open_store(path, "samples")
    check_source(samples, open_store(source_path, "proposals"), path, source_path)
    return samples


def checkpoint_key(embed: dict, loss: dict, train_fingerprint: str, numerics: dict | None = None) -> dict:
    """What a training checkpoint must have been made from: the params that shape training, the inputs, and
    the device and threads its arithmetic ran on (`pipeline.device.numeric_context`)."""
    return {
        "embed": {k: v for k, v in embed.items() if k not in RUN_ONLY},
        "loss": loss,
        "train": train_fingerprint,
        "numerics": numerics or {},
    }


def head_meta(embed: dict, loss: dict, history: list[dict[str, float]]) -> dict:
    """The meta saved with the head (a hashed output): the params that shape it and the per-epoch history,
    without run times or the params of how the run went (`RUN_ONLY`), so equal heads give equal bytes."""
    timeless = [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    shaping = {k: v for k, v in embed.items() if k not in RUN_ONLY}
    return {"params": {"embed": shaping, "loss": loss}, "history": timeless}


def write_embeddings(out, head, features, image_offsets: np.ndarray, attrs: dict, device: str) -> str:
    """The embeddings store of `features` (N, D), written batch by batch (one shard in memory); its fingerprint."""
    with atomic_path(out) as tmp:
        writer = StoreWriter(tmp)
        rows = writer.array("embeddings", (int(features.shape[0]), head.dim), np.float32)
        for batch in embed_batches(head, features, device=device):
            rows.write(batch)
        writer.close(rows)
        writer.write_array("image_offsets", image_offsets)
        return writer.finish(attrs, "embeddings")


def train_head(
    p: Params,
    train,
    device: str,
    *,
    weights: dict | None = None,
    epochs: int | None = None,
    ranks: Ranks | None = None,
    **kwargs,
):
    """`train_embedder` on the train samples store with the embed and loss params (`weights` and `epochs`
    override theirs, for diagnose's baselines); (head, history)."""
    cfg, loss = p.embed, p.loss
    return train_embedder(
        {view: store_array(train, f"features/{view}") for view in VIEWS},
        read_array(train, "image_offsets"),
        store_array(train, "pairs/object"),
        store_array(train, "pairs/hier"),
        hidden=[cfg.hidden],
        dim=cfg.dim,
        geometry=cfg.geometry,
        c=cfg.curvature,
        margin=geometry_margin(loss.margin, cfg.geometry, loss.euclidean_margin),
        weights=weights or {"mask": loss.mask, "object": loss.object, "hier": loss.hier},
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=epochs or cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        num_workers=cfg.num_workers,
        checkpoint_every=cfg.checkpoint_every,
        view=cfg.view,
        init=cfg.init,
        schedule=cfg.schedule,
        ranks=ranks,
        **kwargs,
    )


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    cfg, loss = p.embed, p.loss
    device = pick_device(p.device)
    if launch_ranks("stages.embed", p.dist.nproc, device):
        return
    ranks = init_ranks(device)
    run_device = rank_device(device, ranks)
    train = open_samples(TRAIN)
    val = open_samples(EVAL)
    checkpoint = Checkpoint(
        "embed", checkpoint_key(as_dict(cfg), as_dict(loss), train.attrs["fingerprint"], numeric_context(device))
    )
    live_run = Live(LIVE_DIR, save_dvc_exp=False, dvcyaml=None) if ranks.is_main else nullcontext()
    with live_run as live:

        def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
            live.step = epoch  # also right when a resumed run logs the saved epochs again
            for name, value in metrics.items():
                if name not in ("lr", "triplets", "seconds"):
                    live.log_metric(f"train/{name}", value)
            live.next_step()

        head, history = train_head(
            p,
            train,
            run_device,
            log=log_epoch if ranks.is_main else None,
            checkpoint=checkpoint,
            ranks=ranks,
            progress=ranks.is_main,
        )
        triplets = sum(h["triplets"] for h in history)
        train_seconds = sum(h["seconds"] for h in history)
        if ranks.is_main:
            live.summary.update({k: v for k, v in history[-1].items() if k not in ("lr", "seconds")})
    if not main_goes_on(ranks):
        return
    meta = head_meta(as_dict(cfg), as_dict(loss), history)
    save_head(head, EMBEDDER_CHECKPOINT, meta)

    features = store_array(val, f"features/{cfg.view}")
    n_val = int(features.shape[0])
    attrs = {
        "split": EVAL,
        "geometry": cfg.geometry,
        "curvature": cfg.curvature,
        "dim": cfg.dim,
        "view": cfg.view,
        "margin": geometry_margin(loss.margin, cfg.geometry, loss.euclidean_margin),
        "params": meta["params"],
        "source": str(split_dir(EVAL) / "samples.zarr"),
        "source_fingerprint": val.attrs["fingerprint"],
        "counts": {"proposals": n_val, "train_proposals": int(train["features/box"].shape[0])},
    }
    out = split_dir(EVAL) / "embeddings.zarr"
    write_embeddings(out, head, features, read_array(val, "image_offsets"), attrs, run_device)
    checkpoint.clear()
    final = ", ".join(f"{t} {history[-1][t]:.4f}" for t in ("mask", "object", "hier") if t in history[-1])
    summary(
        "embed",
        f"{cfg.geometry} d={cfg.dim}, {cfg.view} view, {len(history)} epochs, {triplets:.0f} triplets at "
        f"{triplets / max(train_seconds, 1e-9):.0f}/s on {device} x {ranks.world_size} rank(s); final {final}; "
        f"{n_val} {EVAL} embeddings -> {out}",
        timer,
    )
    shutdown(ranks)


if __name__ == "__main__":
    typer.run(main)
