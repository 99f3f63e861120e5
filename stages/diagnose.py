"""diagnose: what the val split's sampled (parent, child) pairs are, and whether the embedding learnt them.

python -m stages.diagnose             # after `dvc repro`; reads the val stores, writes nothing
python -m stages.diagnose --no-baselines   # without the two baseline heads (each as long as `embed`)

The "parent nearer the origin" share has two baselines beside the trained head's: the same head untrained
(same init and seed: what the share is before any learning) and a head trained with the same params but
L_hier off (what the other terms alone order); only the difference to the second is L_hier's doing.

Not a pipeline stage: it explains a result (README, "Hyperbolic is not better than Euclidean") from the
stores the pipeline wrote. The object-part breakdown needs the synthetic world's part annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.data.dataset import read_manifest
from pipeline.device import pick_device
from pipeline.evaluation.detections import proposal_rles
from pipeline.evaluation.diagnostics import PAIR_KINDS, pair_breakdown, parent_nearer_origin
from pipeline.evaluation.lvis_eval import load_lvis
from pipeline.evaluation.matching import match_proposals
from pipeline.models.embedding import embed_features
from pipeline.models.embedding_train import initial_head
from pipeline.stores.store import check_source, open_store, read_array, store_array
from stages.common import MANIFEST, clean_errors, params, split_dir
from stages.embed import open_samples, train_head

SPLIT = "val"


def _share(line: str, learnt: dict, geometry: str) -> str:
    return (
        f"{line}: the parent is nearer the origin in {100 * learnt['fraction']:.1f} % "
        f"(mean distance {learnt['d0_parent']:.2f} against {learnt['d0_child']:.2f}, {geometry})"
    )


def baseline_shares(p, pairs, geometry: str, c: float) -> dict[str, dict]:
    """The share for an untrained head (same params, init and seed) and one trained without L_hier."""
    device = pick_device(p.device)
    train, val = open_samples("train"), open_samples(SPLIT)
    features = store_array(val, f"features/{p.embed.view}")
    weights = {"mask": p.loss.mask, "object": p.loss.object, "hier": 0.0}
    cfg = p.embed
    in_dim = int(features.shape[1])
    untrained = initial_head(in_dim, [cfg.hidden], cfg.dim, geometry, c, seed=cfg.seed, init=cfg.init)
    no_hier, _ = train_head(p, train, device, weights=weights)
    return {
        "untrained head": parent_nearer_origin(embed_features(untrained, features, device=device), pairs, geometry, c),
        "trained without L_hier": parent_nearer_origin(
            embed_features(no_hier, features, device=device), pairs, geometry, c
        ),
    }


@clean_errors
def main(
    params_file: str = typer.Option("params.yaml", help="params file (for evaluate.match_iou)"),
    baselines: bool = typer.Option(True, help="also an untrained head and a head trained without L_hier"),
) -> None:
    folder = split_dir(SPLIT)
    paths = {kind: folder / f"{kind}.zarr" for kind in ("proposals", "samples", "embeddings")}
    stores = {kind: open_store(path, kind) for kind, path in paths.items()}
    check_source(stores["samples"], stores["proposals"], paths["samples"], paths["proposals"])
    check_source(stores["embeddings"], stores["samples"], paths["embeddings"], paths["samples"])
    pairs = read_array(stores["samples"], "pairs/hier")
    embeddings = stores["embeddings"]
    learnt = parent_nearer_origin(
        read_array(embeddings, "embeddings"), pairs, embeddings.attrs["geometry"], float(embeddings.attrs["curvature"])
    )
    geometry, c = embeddings.attrs["geometry"], float(embeddings.attrs["curvature"])
    print(_share(f"{SPLIT}: {len(pairs)} sampled (parent, child) pairs; trained head", learnt, geometry))
    if baselines:
        for name, share in baseline_shares(params(params_file), pairs, geometry, c).items():
            print(_share(f"{SPLIT}: {name}", share, geometry))
    manifest = read_manifest(MANIFEST)
    world = Path(manifest.val_json).parent / "world.json"
    if manifest.source != "synthetic" or not world.is_file():
        print(f"no part annotations for {manifest.source} data ({world} missing): no object-part breakdown")
        return
    proposals = stores["proposals"]
    offsets, image_ids, image_hw = (read_array(proposals, key) for key in ("image_offsets", "image_ids", "image_hw"))
    rles = proposal_rles(offsets, read_array(proposals, "boxes"), read_array(proposals, "masks"), image_hw)
    gt = load_lvis(manifest.split_json(SPLIT))
    matches = match_proposals(
        [rles[offsets[i] : offsets[i + 1]] for i in range(len(image_ids))],
        [gt.img_ann_map[int(i)] for i in image_ids],
        image_hw,
        params(params_file).evaluate.match_iou,
    )
    record = json.loads(world.read_text())
    # the deep world's (object, sub-part) pairs are object-part pairs too, two levels apart
    relations = record["relations"][SPLIT] + record.get("relations_transitive", {}).get(SPLIT, [])
    counts = pair_breakdown(pairs, matches.ann_id, relations)
    total = max(1, len(pairs))
    print(", ".join(f"{kind} {counts[kind]} ({100 * counts[kind] / total:.0f} %)" for kind in PAIR_KINDS))
    print(f"(the val ground truth has {len(relations)} annotated object-part pairs)")


if __name__ == "__main__":
    typer.run(main)
