"""End to end on real LVIS v1 + COCO 2017 in their published layout (tests/real_layout.py, tiny).

Every stage module runs directly (`python -m stages.<stage>`) in a temporary copy of the repository with
data.source lvis pointing at the dataset: LVIS records resolve through coco_url (train2017/ or val2017/),
COCO's bare file_names under <image_root>/train2017, and the LVIS val images that COCO train2017 holds
are left out of the proposer's training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.real_layout import write_real_layout
from tests.test_e2e import BIN, copy_repo, run

pytestmark = pytest.mark.e2e

TINY_LVIS = {
    "data.source": "lvis",
    "proposer.image_size": 64,
    "proposer.epochs": 1,
    "proposer.batch_size": 4,
    "propose.score_thresh": 0.01,
    "sample.crop_size": 32,
    "embed.dim": 8,
    "embed.hidden": 32,
    "embed.epochs": 2,
    "embed.batch_size": 64,
    "cluster.k_range": [2, 8, 2],
    "device": "cpu",
}
STAGES = [
    ["stages.prepare"],
    ["stages.train_proposer"],
    ["stages.propose", "--split", "train"],
    ["stages.propose", "--split", "val"],
    ["stages.sample", "--split", "train"],
    ["stages.sample", "--split", "val"],
    ["stages.embed"],
    ["stages.cluster"],
    ["stages.evaluate"],
]
LVIS_METRICS = ("AP", "AP50", "AP75", "APr", "APc", "APf", "APs", "APm", "APl")


class Pipeline:
    """The stages of a repository copy, each run once, in order, on demand; a failing stage fails the test."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.outputs: dict[str, str] = {}

    def upto(self, name: str) -> str:
        """Run every stage up to and including `name` (e.g. "stages.propose --split val"); its output."""
        for args in STAGES:
            key = " ".join(args)
            if key not in self.outputs:
                self.outputs[key] = run([str(BIN / "python"), "-m", *args], self.repo)
            if key == name:
                return self.outputs[key]
        raise KeyError(name)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict:
    return write_real_layout(tmp_path_factory.mktemp("real_layout"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, layout) -> Pipeline:
    lvis_paths = {f"data.lvis.{key}": str(layout[key]) for key in ("train_json", "val_json", "image_root", "coco_json")}
    settings = {**TINY_LVIS, **lvis_paths, "data.lvis.coco_image_root": None}  # published layout: <root>/train2017
    dest = copy_repo(tmp_path_factory.mktemp("real_layout_repo") / "repo", settings, "tiny lvis")
    return Pipeline(dest)


def test_prepare_records_the_proposer_images_and_exclusions(pipeline: Pipeline, layout: dict) -> None:
    output = pipeline.upto("stages.prepare")
    manifest = json.loads((pipeline.repo / "data/prepared/dataset.json").read_text())
    assert manifest["source"] == "lvis"
    assert manifest["image_root"] == str(layout["image_root"])
    assert manifest["proposer_image_root"] == str(layout["coco_image_root"])
    assert manifest["proposer_excluded_image_ids"] == layout["excluded_ids"] == [86, 89, 92]
    assert manifest["base_category_ids"] == layout["base_ids"]
    n_coco, n_excluded = 22, len(layout["excluded_ids"])
    assert f"proposer: {n_coco - n_excluded} of {n_coco} COCO images, {n_excluded} left out" in output
    assert (pipeline.repo / "plots/prepare/preview.png").stat().st_size > 1000


def test_proposer_trains_on_coco_without_lvis_val_images(pipeline: Pipeline, layout: dict) -> None:
    pipeline.upto("stages.train_proposer")
    assert (pipeline.repo / "models/proposer.pt").stat().st_size > 0
    steps = json.loads((pipeline.repo / "dvclive/train_proposer/metrics.json").read_text())["steps"]
    batch = TINY_LVIS["proposer.batch_size"]
    # one epoch over the annotated COCO images less the LVIS val ones (19 - 3 = 16 images: 4 steps, not 5)
    assert steps == math.ceil(layout["proposer_images"] / batch), (steps, layout["proposer_images"])
    assert math.ceil(layout["proposer_images_unexcluded"] / batch) != steps


@pytest.mark.parametrize("split", ["train", "val"])
def test_propose_has_one_row_range_per_lvis_image(pipeline: Pipeline, layout: dict, split: str) -> None:
    import zarr

    pipeline.upto(f"stages.propose --split {split}")
    group = zarr.open_group(str(pipeline.repo / "data" / split / "proposals.zarr"), mode="r")
    image_ids = np.asarray(group["image_ids"][...]).tolist()
    assert image_ids == layout[f"{split}_ids"]
    offsets = np.asarray(group["image_offsets"][...])
    assert len(offsets) == len(image_ids) + 1 and offsets[0] == 0 and (np.diff(offsets) >= 0).all()
    assert offsets[-1] == group["boxes"].shape[0] == group["masks"].shape[0] == group["scores"].shape[0]
    lvis = json.loads(Path(layout[f"{split}_json"]).read_text())
    sizes = {im["id"]: [im["height"], im["width"]] for im in lvis["images"]}
    assert np.asarray(group["image_hw"][...]).tolist() == [sizes[i] for i in image_ids]  # mixed sizes, in order


def test_every_stage_runs_and_evaluate_scores_lvis(pipeline: Pipeline) -> None:
    pipeline.upto("stages.evaluate")
    import zarr

    n = int(zarr.open_group(str(pipeline.repo / "data/val/proposals.zarr"), mode="r")["image_offsets"][-1])
    samples = zarr.open_group(str(pipeline.repo / "data/val/samples.zarr"), mode="r")
    assert samples["features/fg"].shape[0] == n
    embeddings = zarr.open_group(str(pipeline.repo / "data/val/embeddings.zarr"), mode="r")["embeddings"]
    assert embeddings.shape == (n, TINY_LVIS["embed.dim"])
    metrics = json.loads((pipeline.repo / "metrics/eval.json").read_text())
    for row in ("majority", "hungarian", "oracle"):
        assert set(LVIS_METRICS) <= set(metrics[row]), (row, sorted(metrics[row]))
        values = {name: metrics[row][name] for name in LVIS_METRICS}
        # None only where LVIS has no ground truth to score: no object here is large (area > 96^2)
        assert values["APl"] is None, (row, values)
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for k, v in values.items() if k != "APl"), (row, values)
    assert metrics["oracle"]["AP"] >= metrics["hungarian"]["AP"]


def test_evaluate_scores_are_lvisevals(pipeline: Pipeline, layout: dict) -> None:
    """eval.json, scored by the default backend (faster-coco-eval), holds exactly LVISEval's numbers for the
    detections the stage wrote (metrics/detections_<row>.json), on the proposals' images."""
    pipeline.upto("stages.evaluate")
    import zarr

    from pipeline.evaluation.lvis_eval import load_lvis, run_lvis_eval

    metrics = json.loads((pipeline.repo / "metrics/eval.json").read_text())
    assert metrics["params"]["evaluate"]["backend"] == "faster_coco_eval"
    image_ids = zarr.open_group(str(pipeline.repo / "data/val/proposals.zarr"), mode="r")["image_ids"][...].tolist()
    gt = load_lvis(layout["val_json"])
    for row in ("majority", "hungarian", "oracle"):
        detections = json.loads((pipeline.repo / f"metrics/detections_{row}.json").read_text())
        max_dets = metrics["params"]["evaluate"]["max_dets"]
        lvis = run_lvis_eval(gt, detections, max_dets=max_dets, image_ids=image_ids, backend="lvis")
        assert {key: metrics[row][key] for key in LVIS_METRICS} == lvis, row
