"""inspect: print any store's tree, shapes, dtypes, chunks, attrs and statistics.

python -m stages.inspect data/val/proposals.zarr
python -m stages.inspect data/val/proposals.zarr --render 1234 --out plots/inspect/1234.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
import zarr

from pipeline.data.annotation_stream import load_image_records
from pipeline.data.dataset import read_manifest
from pipeline.data.lvis_format import IMAGE_FIELDS, image_path, load_image
from pipeline.errors import PipelineError
from pipeline.experiments.plots import proposal_overlay
from pipeline.geometry.paste import paste_masks
from pipeline.stores.inspect import describe
from stages.common import MANIFEST, clean_errors


def render(group: zarr.Group, image_id: int, out: Path) -> None:
    """Overlay the proposals of one image of a proposals store."""
    if group.attrs.get("kind") != "proposals":
        raise PipelineError(f"--render needs a proposals store, this one is {group.attrs.get('kind')!r}")
    ids = np.asarray(group["image_ids"][...])
    where = np.flatnonzero(ids == image_id)
    if len(where) == 0:
        raise PipelineError(f"image id {image_id} is not in this store ({len(ids)} images, e.g. {ids[:3].tolist()})")
    i = int(where[0])
    offsets = np.asarray(group["image_offsets"][...])
    rows = slice(int(offsets[i]), int(offsets[i + 1]))
    boxes = np.asarray(group["boxes"][rows])
    scores = np.asarray(group["scores"][rows])
    hw = tuple(int(v) for v in group["image_hw"][i])
    masks = paste_masks(np.asarray(group["masks"][rows]), boxes, hw)
    manifest = read_manifest(MANIFEST)
    records = load_image_records(Path(group.attrs["annotations"]), "LVIS annotations", IMAGE_FIELDS)
    record = next(r for r in records if r["id"] == image_id)
    pixels = load_image(image_path(record, Path(manifest.image_root)))
    proposal_overlay(pixels, boxes, scores, masks, out, title=f"image {image_id}: {len(scores)} proposals")


@clean_errors
def main(
    path: Path = typer.Argument(..., help="a .zarr store written by a stage"),
    render_id: int | None = typer.Option(None, "--render", help="image id to draw with its proposals"),
    out: Path | None = typer.Option(None, help="PNG path for --render (default plots/inspect/<id>.png)"),
    stats: bool = typer.Option(True, help="compute per-array statistics"),
) -> None:
    if not (path / "zarr.json").is_file():
        raise PipelineError(f"{path}: no Zarr store here")
    group = zarr.open_group(str(path), mode="r")
    print(describe(group, stats=stats))
    if render_id is not None:
        target = out or Path("plots/inspect") / f"{render_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        render(group, render_id, target)
        print(f"wrote {target}")


if __name__ == "__main__":
    typer.run(main)
