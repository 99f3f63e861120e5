"""prepare: the dataset. Generates the embedded long-tail world, or validates real LVIS/COCO paths.

Writes data/prepared/ (dataset.json, plus world/ for the synthetic source) and plots/prepare/preview.png.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

from pipeline.config import Params
from pipeline.data.dataset import Manifest, base_categories_by_name, write_manifest
from pipeline.data.lvis_format import check_images_exist, validate_coco, validate_lvis
from pipeline.data.synthetic import WorldSpec, generate_world
from pipeline.errors import PipelineError
from pipeline.plots import dataset_preview
from pipeline.store import atomic_path
from stages.common import MANIFEST, PREPARED, Timer, clean_errors, params, summary

PREVIEW = Path("plots/prepare/preview.png")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def prepare_synthetic(p: Params, out: Path) -> tuple[Manifest, str]:
    s = p.data.synthetic
    spec = WorldSpec(
        n_train=s.n_train,
        n_val=s.n_val,
        image_size=s.image_size,
        n_categories=s.n_categories,
        max_objects=s.max_objects,
        seed=p.seed,
    )
    world_tmp = out / "world"
    info = generate_world(spec, world_tmp)
    world = PREPARED / "world"  # the final location, after the atomic rename
    names = ("lvis_v1_train.json", "lvis_v1_val.json", "coco_base_train.json")
    manifest = Manifest(
        source="synthetic",
        train_json=str(world / "lvis_v1_train.json"),
        val_json=str(world / "lvis_v1_val.json"),
        image_root=str(world / "images"),
        proposer_json=str(world / "coco_base_train.json"),
        base_category_ids=sorted(int(i) for i in info["base_category_ids"]),
        files={str(world / n): _digest(world_tmp / n) for n in names},
    )
    text = (
        f"synthetic world: {info['n_images']['train']} train / {info['n_images']['val']} val images, "
        f"{info['n_categories']} categories (buckets {info['buckets']}), {info['n_instances']['train']} train instances"
    )
    return manifest, text


def prepare_lvis(p: Params) -> tuple[Manifest, str]:
    cfg = p.data.lvis
    for key in ("train_json", "val_json", "image_root", "coco_json"):
        if not getattr(cfg, key):
            raise PipelineError(f"params.yaml: data.lvis.{key} is empty; data.source lvis needs it")
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise PipelineError(f"data.lvis.image_root: {root}: folder not found")
    train = validate_lvis(Path(cfg.train_json))
    val = validate_lvis(Path(cfg.val_json))
    coco = validate_coco(Path(cfg.coco_json))
    for dataset in (train, val):
        check_images_exist(dataset["images"], root)
    base = base_categories_by_name(train["categories"], coco["categories"])
    files = {}
    for f in (cfg.train_json, cfg.val_json, cfg.coco_json):
        stat = Path(f).stat()
        files[str(Path(f).resolve())] = f"{stat.st_size}-{int(stat.st_mtime)}"
    manifest = Manifest(
        source="lvis",
        train_json=str(Path(cfg.train_json).resolve()),
        val_json=str(Path(cfg.val_json).resolve()),
        image_root=str(root.resolve()),
        proposer_json=str(Path(cfg.coco_json).resolve()),
        base_category_ids=base,
        files=files,
    )
    text = (
        f"LVIS: {len(train['images'])} train / {len(val['images'])} val images, "
        f"{len(train['categories'])} categories, {len(base)} matched to COCO as base"
    )
    return manifest, text


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    if p.data.source == "synthetic":
        with atomic_path(PREPARED) as out:
            out.mkdir(parents=True)
            manifest, text = prepare_synthetic(p, out)
            write_manifest(out / MANIFEST.name, manifest)
    else:
        manifest, text = prepare_lvis(p)
        with atomic_path(PREPARED) as out:
            out.mkdir(parents=True)
            write_manifest(out / MANIFEST.name, manifest)
    with atomic_path(PREVIEW) as tmp:
        dataset_preview(Path(manifest.train_json), Path(manifest.image_root), tmp.with_suffix(".png"))
        tmp.with_suffix(".png").rename(tmp)
    summary("prepare", text + f"; preview {PREVIEW}", timer)


if __name__ == "__main__":
    typer.run(main)
