"""diagnose: what the val split's sampled (parent, child) pairs are, and whether the embedding learnt them.

python -m stages.diagnose             # after `dvc repro`; reads the val stores, writes nothing

Not a pipeline stage: it explains a result (README, "Hyperbolic is not better than Euclidean") from the
stores the pipeline wrote. The object-part breakdown needs the synthetic world's part annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.data.dataset import read_manifest
from pipeline.diagnostics import PAIR_KINDS, pair_breakdown, parent_nearer_origin
from pipeline.evaluation.detections import proposal_rles
from pipeline.evaluation.lvis_eval import load_lvis
from pipeline.evaluation.matching import match_proposals
from pipeline.store import check_source, open_store, read_array
from stages.common import MANIFEST, clean_errors, params, split_dir

SPLIT = "val"


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file (for evaluate.match_iou)")) -> None:
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
    print(
        f"{SPLIT}: {len(pairs)} sampled (parent, child) pairs; the parent is nearer the origin in "
        f"{100 * learnt['fraction']:.1f} % (mean distance {learnt['d0_parent']:.2f} against {learnt['d0_child']:.2f}, "
        f"{embeddings.attrs['geometry']})"
    )
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
    relations = json.loads(world.read_text())["relations"][SPLIT]
    counts = pair_breakdown(pairs, matches.ann_id, relations)
    total = max(1, len(pairs))
    print(", ".join(f"{kind} {counts[kind]} ({100 * counts[kind] / total:.0f} %)" for kind in PAIR_KINDS))
    print(f"(the val ground truth has {len(relations)} annotated object-part pairs)")


if __name__ == "__main__":
    typer.run(main)
