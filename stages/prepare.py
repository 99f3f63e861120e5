"""prepare: the dataset. Generates the embedded long-tail world, or checks real LVIS v1 + COCO 2017 in place.

Writes data/prepared/ (dataset.json, plus world/ for the synthetic source) and plots/prepare/preview.png,
only once every check has passed. Real data is never copied: the manifest names the files, the image
folders (LVIS through coco_url under image_root, COCO's bare file_names under <image_root>/train2017 or
data.lvis.coco_image_root) and the COCO images the proposer must leave out because LVIS val holds them.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.config import LvisData, Params
from pipeline.data.annotation_stream import load_image_records
from pipeline.data.dataset import Manifest, base_categories_by_name, write_manifest
from pipeline.data.lvis_format import (
    AnnotationFile,
    check_sampled_images,
    excluded_image_ids,
    validate_coco,
    validate_lvis,
)
from pipeline.data.synthetic import WorldSpec, generate_world
from pipeline.errors import PipelineError
from pipeline.experiments.plots import dataset_preview
from pipeline.stores.store import atomic_path, file_digest
from stages.common import MANIFEST, PREPARED, Timer, clean_errors, params, summary

PREVIEW = Path("plots/prepare/preview.png")
IMAGE_SAMPLE = 50  # images checked per annotation file (present, readable, recorded size)


def prepare_synthetic(p: Params, out: Path) -> tuple[Manifest, str]:
    s = p.data.synthetic
    spec = WorldSpec(
        n_train=s.n_train,
        n_val=s.n_val,
        image_size=s.image_size,
        n_categories=s.n_categories,
        max_objects=s.max_objects,
        seed=p.seed,
        hierarchy=s.hierarchy,
    )
    world_tmp = out / "world"
    info = generate_world(spec, world_tmp)
    world = PREPARED / "world"  # the final location, after the atomic rename
    names = ("lvis_v1_train.json", "lvis_v1_val.json", "coco_base_train.json")
    # the world's proposer file holds its train images only (val ids follow the train ids): nothing to leave out
    excluded = excluded_image_ids(
        load_image_records(world_tmp / "lvis_v1_val.json", "LVIS val annotations"),
        load_image_records(world_tmp / "coco_base_train.json", "COCO annotations"),
    )
    manifest = Manifest(
        source="synthetic",
        train_json=str(world / "lvis_v1_train.json"),
        val_json=str(world / "lvis_v1_val.json"),
        image_root=str(world / "images"),
        proposer_json=str(world / "coco_base_train.json"),
        base_category_ids=sorted(int(i) for i in info["base_category_ids"]),
        files={str(world / n): file_digest(world_tmp / n) for n in names},
        proposer_image_root=str(world / "images"),
        proposer_excluded_image_ids=excluded,
    )
    text = (
        f"synthetic world: {info['n_images']['train']} train / {info['n_images']['val']} val images, "
        f"{info['n_categories']} categories (buckets {info['buckets']}), {info['n_instances']['train']} train instances"
    )
    return manifest, text


def coco_image_folder(cfg: LvisData) -> Path:
    """The folder of the COCO file's bare file_names: data.lvis.coco_image_root, else <image_root>/train2017."""
    if cfg.coco_image_root:
        folder = Path(cfg.coco_image_root)
        if not folder.is_dir():
            raise PipelineError(f"data.lvis.coco_image_root: {folder}: folder not found")
        return folder
    folder = Path(cfg.image_root) / "train2017"
    if not folder.is_dir():
        raise PipelineError(
            f"data.lvis.image_root: {Path(cfg.image_root)} has no train2017 folder for the COCO file's images "
            f"({folder} not found; set data.lvis.coco_image_root to where they are)"
        )
    return folder


def prepare_lvis(p: Params, params_file: str = "params.yaml") -> tuple[Manifest, str]:
    """`check_lvis` without the train file's summary: (manifest, summary line)."""
    manifest, text, _ = check_lvis(p, params_file)
    return manifest, text


def _as_given(path: str | Path) -> str:
    """A path as params give it, normalised (``a/./b`` -> ``a/b``) but neither made absolute nor resolved."""
    return os.path.normpath(path)


def check_lvis(p: Params, params_file: str = "params.yaml") -> tuple[Manifest, str, AnnotationFile]:
    """Check real LVIS v1 + COCO 2017 in their published layout; writes nothing, raises a one-line error.

    The three annotation files must parse and be well formed; a seeded sample of each file's images must
    exist, open and have the recorded size: LVIS train and val under image_root through coco_url
    (train2017/ or val2017/), COCO under its own folder through its bare file_name. LVIS v1 val images that
    the COCO file also holds (LVIS ids are COCO ids) are recorded as the proposer's excluded images.
    """
    cfg = p.data.lvis
    for key in ("train_json", "val_json", "image_root", "coco_json"):
        if not getattr(cfg, key):
            raise PipelineError(f"{params_file}: data.lvis.{key} is empty; data.source lvis needs it")
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise PipelineError(f"data.lvis.image_root: {root}: folder not found")
    coco_root = coco_image_folder(cfg)
    inputs = {
        "train": (Path(cfg.train_json), "LVIS train annotations", validate_lvis, root),
        "val": (Path(cfg.val_json), "LVIS val annotations", validate_lvis, root),
        "coco": (Path(cfg.coco_json), "COCO annotations", validate_coco, coco_root),
    }
    data = {name: validate(path, what) for name, (path, what, validate, _) in inputs.items()}
    for name, (path, what, _, folder) in inputs.items():
        check_sampled_images(data[name].images, folder, what, path, sample=IMAGE_SAMPLE, seed=p.seed)
    train, val, coco = data["train"], data["val"], data["coco"]
    base = base_categories_by_name(train.categories, coco.categories)
    excluded = excluded_image_ids(val.images, coco.images)
    # The manifest holds the paths as given (a relative one stays relative to the workspace, so two clones
    # write the same bytes) and each file's content digest (a touched or copied file changes nothing downstream).
    manifest = Manifest(
        source="lvis",
        train_json=_as_given(cfg.train_json),
        val_json=_as_given(cfg.val_json),
        image_root=_as_given(root),
        proposer_json=_as_given(cfg.coco_json),
        base_category_ids=base,
        files={_as_given(path): file_digest(path) for path, *_ in inputs.values()},
        proposer_image_root=_as_given(coco_root),
        proposer_excluded_image_ids=excluded,
    )
    n_coco = len(coco.images)
    text = (
        f"LVIS: {len(train.images)} train / {len(val.images)} val images, "
        f"{len(train.categories)} categories, {len(base)} matched to COCO as base; proposer: "
        f"{n_coco - len(excluded)} of {n_coco} COCO images, {len(excluded)} left out as LVIS val images"
    )
    if coco.n_short_polygons:
        text += (
            f"; {coco.n_short_polygons} COCO annotations hold polygons under three points or of odd length "
            "(train_proposer leaves those polygons out, as detectron2 does)"
        )
    return manifest, text, train


def _preview(train_json: Path, image_root: Path, summary: AnnotationFile | None = None) -> None:
    with atomic_path(PREVIEW) as tmp:
        dataset_preview(train_json, image_root, tmp.with_suffix(".png"), summary=summary)
        tmp.with_suffix(".png").rename(tmp)


@clean_errors
def main(params_file: str = typer.Option("params.yaml", help="params file")) -> None:
    timer = Timer()
    p = params(params_file)
    # Every check runs before the atomic rename: on error the previous data/prepared stays as it was.
    if p.data.source == "synthetic":
        with atomic_path(PREPARED) as out:
            out.mkdir(parents=True)
            manifest, text = prepare_synthetic(p, out)
            write_manifest(out / MANIFEST.name, manifest)
            _preview(out / "world" / "lvis_v1_train.json", out / "world" / "images")
    else:
        manifest, text, train = check_lvis(p, params_file)
        with atomic_path(PREPARED) as out:
            out.mkdir(parents=True)
            write_manifest(out / MANIFEST.name, manifest)
            _preview(Path(manifest.train_json), Path(manifest.image_root), train)
    summary("prepare", text + f"; preview {PREVIEW}", timer)


if __name__ == "__main__":
    typer.run(main)
