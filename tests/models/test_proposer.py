"""The proposer (`pipeline.models.proposer`): build, forward, propose contract, checkpoints, evaluation; training is in
test_proposer_train.py."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops import roi_align

from pipeline.data.proposer_data import CocoInstances, _decode_segmentation
from pipeline.errors import PipelineError
from pipeline.evaluation.proposal_metrics import evaluate_proposals
from pipeline.models.proposer import (
    BACKBONES,
    MASK_SIZE,
    _ClassAgnosticRoIHeads,
    build_model,
    load_checkpoint,
    propose,
    save_checkpoint,
)

torch.set_num_threads(1)

SIZE = 64


def _image(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check_contract(result: dict, max_n: int) -> None:
    n = len(result["scores"])
    assert n <= max_n
    assert result["boxes"].shape == (n, 4) and result["boxes"].dtype == np.float32
    assert result["scores"].shape == (n,) and result["scores"].dtype == np.float32
    assert result["masks"].shape == (n, MASK_SIZE, MASK_SIZE) and result["masks"].dtype == np.uint8
    assert np.all(np.diff(result["scores"]) <= 0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_build_and_forward(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, SIZE, score_thresh=0.0)
    (result,) = propose(model, [_image(0, 48, SIZE)], device="cpu")
    _check_contract(result, 20)
    assert len(result["scores"]) > 0
    assert result["boxes"][:, [0, 2]].max() <= SIZE and result["boxes"][:, [1, 3]].max() <= 48
    model.train()
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones((1, SIZE, SIZE), dtype=torch.uint8)}  # fmt: skip
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target, target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_unknown_backbone():
    with pytest.raises(PipelineError, match="backbone"):
        build_model("vgg", SIZE)


def test_propose_contract_batched_and_empty():
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, score_thresh=0.0, max_proposals=7)
    images = [_image(1), _image(2, 40, 96), _image(3, 100, 70)]
    for img, res in zip(images, propose(model, images, device="cpu"), strict=True):
        _check_contract(res, 7)
        assert len(res["scores"]) == 7
        h, w = img.shape[:2]
        assert res["boxes"][:, [0, 2]].max() <= w + 1e-3 and res["boxes"][:, [1, 3]].max() <= h + 1e-3
    # images of one size need no padding: batching them does not change the proposals
    same = [_image(4), _image(5), _image(6)]
    batched = propose(model, same, device="cpu")
    single = [propose(model, [img], device="cpu")[0] for img in same]
    for res, one in zip(batched, single, strict=True):
        np.testing.assert_allclose(res["scores"], one["scores"], atol=1e-4)
        np.testing.assert_allclose(res["boxes"], one["boxes"], atol=1e-2)
    none = build_model("resnet18", SIZE, score_thresh=1.0)
    (empty,) = propose(none, [_image(1)], device="cpu")
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == np.float32
    assert empty["scores"].shape == (0,) and empty["scores"].dtype == np.float32
    assert empty["masks"].shape == (0, MASK_SIZE, MASK_SIZE) and empty["masks"].dtype == np.uint8
    with pytest.raises(PipelineError, match="uint8"):
        propose(model, [np.zeros((8, 8), dtype=np.uint8)], device="cpu")


def test_class_agnostic_postprocess_merges_classes():
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, num_classes=4, score_thresh=0.3, nms_thresh=0.5)
    heads = model.roi_heads
    assert isinstance(heads, _ClassAgnosticRoIHeads)
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 10.0, 31.0, 30.0], [40.0, 40.0, 60.0, 60.0]])]
    logits = torch.full((3, 4), -10.0)
    logits[0, 2] = 5.0  # RoI 0: class 2, RoI 1 (same place): class 3, lower; RoI 2: class 1
    logits[1, 3] = 4.0
    logits[2, 1] = 3.0
    boxes, scores, labels = heads.postprocess_detections(logits, torch.zeros(3, 16), proposals, [(SIZE, SIZE)])
    assert labels[0].tolist() == [2, 1]  # RoI 1 suppressed across classes, one detection per RoI
    torch.testing.assert_close(boxes[0], proposals[0][[0, 2]])
    assert scores[0][0] > scores[0][1]


def test_dataset(proposer_world):
    path, root = proposer_world
    data = CocoInstances(path, root)
    assert len(data) == 6  # the image without annotations is skipped
    assert len(CocoInstances(path, root, skip_empty=False)) == 7
    image, target = data[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32 and image.max() <= 1
    assert target["boxes"].shape == (2, 4)  # degenerate and crowd annotations are dropped
    assert target["labels"].tolist() == [1, 1]
    assert target["masks"].shape == (2, SIZE, SIZE) and target["masks"].dtype == torch.uint8
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        x1, y1, x2, y2 = box.int().tolist()
        assert mask.sum() == pytest.approx((x2 - x1) * (y2 - y1), rel=0.15)


def test_dataset_drops_polygons_under_three_points(tmp_path):
    """As detectron2's load_coco_json: short polygons are left out of the mask, an instance left without a
    polygon is dropped (pycocotools would read a first polygon of four numbers as a box and fail)."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(_image(0, 16, 16)).save(tmp_path / "img" / "a.png")
    square = [2, 2, 10, 2, 10, 10, 2, 10]

    def ann(i, segmentation):
        return {
            "id": i,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 2, 8, 8],
            "iscrowd": 0,
            "segmentation": segmentation,
        }

    coco = {
        "images": [{"id": 1, "width": 16, "height": 16, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [ann(1, [[2, 2, 10, 2], square]), ann(2, [[2, 2, 10, 2]]), ann(3, []), ann(4, [square])],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    _, target = CocoInstances(path, tmp_path / "img")[0]
    assert target["boxes"].shape == (2, 4)  # annotations 1 and 4
    assert torch.equal(target["masks"][0], target["masks"][1]) and target["masks"][0].sum() > 0


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, score_thresh=0.0)
    with torch.no_grad():  # non-default batch-norm statistics must travel too
        model.backbone.body.bn1.running_mean.uniform_(-0.1, 0.1)
    images = [_image(5), _image(6, 50, 64)]
    before = propose(model, images, device="cpu")
    path = tmp_path / "models" / "proposer.pt"
    save_checkpoint(model, path, "resnet18", SIZE)
    assert [p.name for p in path.parent.iterdir()] == ["proposer.pt"]
    again = tmp_path / "elsewhere.pt"
    save_checkpoint(model, again, "resnet18", SIZE)
    assert again.read_bytes() == path.read_bytes()  # same weights, same bytes: DVC sees no change
    # nothing from the clock: the archive's entries carry zip's fixed epoch, the payload no time field
    assert {info.date_time for info in zipfile.ZipFile(path).infolist()} == {(1980, 0, 0, 0, 0, 0)}
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"state_dict", "backbone", "image_size", "num_classes", "light_heads"}
    loaded = load_checkpoint(path, "resnet18", SIZE, score_thresh=0.0)
    after = propose(loaded, images, device="cpu")
    for a, b in zip(before, after, strict=True):
        for key in ("boxes", "scores", "masks"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(PipelineError, match="backbone"):
        load_checkpoint(path, "resnet50", SIZE)
    with pytest.raises(PipelineError, match="image_size"):
        load_checkpoint(path, "resnet18", 2 * SIZE)


def test_load_torchvision_coco_state_dict(tmp_path):
    """A torchvision COCO-layout state dict (91 classes, frozen batch norm) loads and proposes class-agnostically."""
    torch.manual_seed(0)
    trunk = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    reference = MaskRCNN(_resnet_fpn_extractor(trunk, 3), num_classes=91)
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(reference.state_dict(), path)
    model = load_checkpoint(path, "resnet50", SIZE, score_thresh=0.0, max_proposals=5)
    assert model.roi_heads.box_predictor.cls_score.out_features == 91
    (result,) = propose(model, [_image(7)], device="cpu")
    _check_contract(result, 5)
    with pytest.raises(PipelineError, match=str(path).replace("\\", "\\\\") + ".*incompatible"):
        load_checkpoint(path, "resnet18", SIZE)


def test_load_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(PipelineError, match="nope.pt.*not found"):
        load_checkpoint(missing, "resnet18", SIZE)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file at all")
    with pytest.raises(PipelineError, match="garbage.pt.*not a readable torch checkpoint") as err:
        load_checkpoint(garbage, "resnet18", SIZE)
    assert "\n" not in str(err.value)
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo": torch.zeros(2)}, wrong)
    with pytest.raises(PipelineError, match="wrong.pt.*not a Mask R-CNN"):
        load_checkpoint(wrong, "resnet18", SIZE)
    ours = tmp_path / "ours.pt"
    torch.save(
        {"state_dict": {"foo": torch.zeros(2)}, "backbone": "resnet18", "image_size": SIZE, "num_classes": 2}, ours
    )
    with pytest.raises(PipelineError, match="ours.pt.*incompatible.*missing keys"):
        load_checkpoint(ours, "resnet18", SIZE)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(PipelineError, match="list.pt"):
        load_checkpoint(listed, "resnet18", SIZE)


def _gt_as_proposals(gt_path: Path, image_ids: list[int]) -> list[dict]:
    data = json.loads(gt_path.read_text())
    out = []
    for image_id in image_ids:
        info = next(i for i in data["images"] if i["id"] == image_id)
        anns = [
            a
            for a in data["annotations"]
            if a["image_id"] == image_id and not a.get("iscrowd", 0) and a["segmentation"]
        ]
        boxes, masks = [], []
        for a in anns:
            mask = _decode_segmentation(a["segmentation"], info["height"], info["width"])
            x, y, w, h = a["bbox"]
            box = torch.tensor([[0.0, x, y, x + w, y + h]])
            boxes.append([x, y, x + w, y + h])
            masks.append(roi_align(torch.from_numpy(mask)[None, None].float(), box, (MASK_SIZE, MASK_SIZE), 1.0)[0, 0])
        probs = torch.stack(masks) if masks else torch.zeros(0, MASK_SIZE, MASK_SIZE)
        out.append(
            {
                "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                "scores": np.linspace(0.9, 0.6, len(anns)).astype(np.float32),
                "masks": torch.round(probs * 255).to(torch.uint8).numpy(),
            }
        )
    return out


def test_evaluate_proposals_perfect_and_degraded(proposer_world):
    path, _ = proposer_world
    ids = [1, 2, 3, 4, 5, 6, 99]
    props = _gt_as_proposals(path, ids)
    result = evaluate_proposals(props, path, ids, {1})
    assert result["n_gt/base"] == 6 and result["n_gt/novel"] == 6 and result["n_gt/all"] == 12
    for subset in ("base", "novel", "all"):
        assert result[f"recall@20/{subset}"] == 1.0
        assert result[f"ap50/{subset}"] == pytest.approx(1.0)
    # a top-scoring false positive on every image lowers AP but not recall; k=1 keeps only it
    noisy = []
    for p in props:
        noisy.append(
            {
                "boxes": np.concatenate([np.array([[0, 0, 4, 4]], np.float32), p["boxes"]]),
                "scores": np.concatenate([np.array([0.95], np.float32), p["scores"]]),
                "masks": np.concatenate([np.full((1, MASK_SIZE, MASK_SIZE), 255, np.uint8), p["masks"]]),
            }
        )
    degraded = evaluate_proposals(noisy, path, ids, {1})
    assert degraded["recall@20/all"] == 1.0
    assert 0.3 < degraded["ap50/all"] < 1.0
    top1 = evaluate_proposals(noisy, path, ids, {1}, k=1)
    assert top1["recall@1/all"] == 0.0 and top1["ap50/all"] == 0.0
    with pytest.raises(PipelineError):
        evaluate_proposals(props[:2], path, ids, {1})
    with pytest.raises(PipelineError, match="12345"):
        evaluate_proposals(props[:1], path, [12345], {1})


def test_dataset_with_a_label_map_is_class_aware(proposer_world):
    path, root = proposer_world
    data = CocoInstances(path, root, label_map={1: 5, 2: 7})
    _, target = data[0]
    assert target["labels"].tolist() == [5, 7]  # category 1 -> 5, category 2 -> 7
    with pytest.raises(PipelineError, match="not a COCO instances file"):
        CocoInstances(path, root, label_map={1: 5})  # category 2 has no label


# ------------------------------------------------------------------------ inference: workers, tensors, amp


def test_propose_takes_tensors_and_amp():
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, score_thresh=0.0, max_proposals=5)
    images = [_image(8), _image(9)]
    ref = propose(model, images, device="cpu")
    from_tensors = propose(model, [torch.from_numpy(img) for img in images], device="cpu")
    for a, b in zip(ref, from_tensors, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in ("boxes", "scores", "masks", "labels"))
    for amp in ("bf16", "fp16"):
        try:
            mixed = propose(model, images, device="cpu", amp=amp)
        except PipelineError as err:  # a torch build without that CPU autocast says so in one line
            assert amp in str(err)
            continue
        for res in mixed:
            _check_contract(res, 5)
    with pytest.raises(PipelineError, match="amp"):
        propose(model, images, device="cpu", amp="int8")
    with pytest.raises(PipelineError, match="uint8"):
        propose(model, [torch.zeros((8, 8, 3))], device="cpu")


def _records(proposer_world) -> tuple[list[dict], Path]:
    path, root = proposer_world
    records = json.loads(path.read_text())["images"][:6]
    return records + [{"id": 77, "file_name": "train/missing.png", "height": SIZE, "width": SIZE}], root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_propose_split_with_workers_is_the_in_process_split(proposer_world, num_workers):
    from pipeline.stores.proposals import propose_split

    records, root = _records(proposer_world)
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, score_thresh=0.0, max_proposals=4)
    seen = []

    def infer(batch):
        seen.append([type(img).__name__ for img in batch])
        return propose(model, batch, device="cpu")

    kw = {"batch_size": 3, "mask_size": MASK_SIZE, "on_missing_image": "skip", "progress": False}
    base = propose_split(records, root, lambda b: propose(model, b, device="cpu"), **kw)
    got = propose_split(records, root, infer, num_workers=num_workers, **kw)
    assert got.skipped == base.skipped == [77]
    assert [len(b) for b in seen] == [3, 3]  # the missing image is left out of its batch
    assert {t for b in seen for t in b} == {"Tensor" if num_workers else "ndarray"}
    for name, value in base.arrays().items():
        assert np.array_equal(getattr(got, name), value), name
    with pytest.raises(PipelineError, match=r"missing\.png") as err:
        propose_split(records, root, infer, num_workers=num_workers, **{**kw, "on_missing_image": "error"})
    assert "DataLoader" not in str(err.value)  # the stage's own one-line error, not a worker traceback


def test_propose_parts_read_every_part_through_one_set_of_workers(proposer_world, tmp_path, monkeypatch):
    """Across the parts of a split the images are decoded by one set of workers (not a new set per part), in
    each part's own batches, into the same store as without workers."""
    import os

    from pipeline.stores import proposals as proposals_module
    from pipeline.stores.parts import ImageParts
    from pipeline.stores.proposals import proposal_columns, propose_parts
    from pipeline.stores.store import open_store, read_array

    records, root = _records(proposer_world)  # 7 images, the last one missing
    reads = tmp_path / "reads.txt"
    load = proposals_module.load_image

    def logged(path):
        with reads.open("a") as log:  # which process read which file
            log.write(f"{os.getpid()} {Path(path).name}\n")
        return load(path)

    monkeypatch.setattr(proposals_module, "load_image", logged)
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, score_thresh=0.0, max_proposals=4)
    stores, skipped = {}, {}
    for workers in (0, 2):
        reads.write_text("")
        batches = []

        def infer(batch, batches=batches):
            batches.append(len(batch))
            return propose(model, batch, device="cpu")

        out = tmp_path / f"workers{workers}.zarr"
        parts = ImageParts(out, {}, proposal_columns(MASK_SIZE), len(records), images_per_part=3)
        propose_parts(
            parts,
            records,
            root,
            infer,
            batch_size=2,
            mask_size=MASK_SIZE,
            on_missing_image="skip",
            progress=False,
            num_workers=workers,
        )
        assert batches == [2, 1, 2, 1]  # parts [0, 3), [3, 6), [6, 7): batches of 2 inside each; 6 is missing
        log = [line.split() for line in reads.read_text().splitlines()]
        assert len(log) == 7
        pids = {int(pid) for pid, _ in log}
        if workers:
            assert os.getpid() not in pids and len(pids) <= workers  # a set per part would be up to 6 processes
        else:
            assert pids == {os.getpid()}
        skipped[workers] = [m["skipped"] for m in parts.metas()]
        parts.assemble({}, kind="proposals")
        stores[workers] = open_store(out, "proposals")
    assert skipped[0] == skipped[2] == [[], [], [77]]
    for name in ("image_ids", "image_hw", "image_offsets", "boxes", "scores", "masks"):
        assert np.array_equal(read_array(stores[0], name), read_array(stores[2], name)), name
