"""The proposer: build, forward, propose contract, training, checkpoints, evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import misc as misc_nn_ops

from pipeline.checkpoint import Checkpoint
from pipeline.config import Params, Proposer
from pipeline.data.dataset import Manifest
from pipeline.distributed import Ranks
from pipeline.errors import PipelineError
from pipeline.proposal_metrics import evaluate_proposals
from pipeline.proposer import (
    BACKBONES,
    MASK_SIZE,
    _ClassAgnosticRoIHeads,
    _EpochBatches,
    _share,
    build_model,
    load_checkpoint,
    propose,
    save_checkpoint,
    train_proposer,
)
from pipeline.proposer_data import CocoInstances, _decode_segmentation
from pipeline.roi_align import SparseGradRoIAlign

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


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """Six 64 px noise images, each with two flat-coloured rectangles (one polygon, one RLE), COCO json."""
    root = tmp_path_factory.mktemp("world")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(6):
        pixels = (rng.integers(0, 80, (SIZE, SIZE, 3))).astype(np.uint8)
        for j in range(2):
            w, h = (int(v) for v in rng.integers(14, 28, 2))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            pixels[y : y + h, x : x + w] = (230, 200 - 120 * j, 40 + 150 * j)
            if j == 0:
                seg = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            else:
                mask = np.zeros((SIZE, SIZE), dtype=np.uint8, order="F")
                mask[y : y + h, x : x + w] = 1
                seg = mask_utils.encode(mask)
                seg["counts"] = seg["counts"].decode("ascii")
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": j + 1, "bbox": [x, y, w, h],
                 "area": w * h, "segmentation": seg, "iscrowd": 0}
            )  # fmt: skip
        Image.fromarray(pixels).save(root / "train" / f"{i:06d}.png")
        images.append({"id": i + 1, "file_name": f"train/{i:06d}.png", "height": SIZE, "width": SIZE})
    images.append({"id": 99, "file_name": "train/000000.png", "height": SIZE, "width": SIZE})  # no annotations
    anns.append({"id": 100, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 5], "segmentation": [], "iscrowd": 0})
    anns.append({"id": 101, "image_id": 1, "category_id": 1, "bbox": [3, 3, 9, 9], "segmentation": [], "iscrowd": 1})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = root / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, root


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


def test_dataset(world):
    path, root = world
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


def test_training_lowers_loss_and_is_deterministic(world):
    path, root = world

    def run():
        torch.manual_seed(0)
        model = build_model("resnet18", SIZE)
        seen = []
        history = train_proposer(
            model, path, root, epochs=5, batch_size=2, lr=0.01, seed=3, device="cpu",
            log_step=lambda step, rec: seen.append(step), progress=False,
        )  # fmt: skip
        assert seen == list(range(len(history)))
        return [h["loss"] for h in history], history

    losses, history = run()
    assert len(losses) == 15 and {"loss", "lr", "loss_mask", "loss_objectness"} <= set(history[0])
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    again, _ = run()
    assert again == losses


def test_training_nan_is_reported(world):
    path, root = world
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE)
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(float("nan"))
    with pytest.raises(PipelineError, match="step 0"):
        train_proposer(model, path, root, epochs=1, batch_size=2, lr=0.01, seed=0, device="cpu", progress=False)


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


def test_evaluate_proposals_perfect_and_degraded(world):
    path, _ = world
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


def test_dataset_with_a_label_map_is_class_aware(world):
    path, root = world
    data = CocoInstances(path, root, label_map={1: 5, 2: 7})
    _, target = data[0]
    assert target["labels"].tolist() == [5, 7]  # category 1 -> 5, category 2 -> 7
    with pytest.raises(PipelineError, match="not a COCO instances file"):
        CocoInstances(path, root, label_map={1: 5})  # category 2 has no label


# --------------------------------------------------------------------------------------------------
# resumable training and left-out images

RUN = {"epochs": 4, "batch_size": 4, "lr": 0.01, "seed": 3}  # 6 images: batches of 4 and 2, 8 steps
REPO = Path(__file__).resolve().parents[1]

# a run in its own process, killed for real: it blocks in log_step at step `block_at` (after the
# checkpoint of step 3, with step 3's and 4's updates only in memory) until SIGKILL
_KILLABLE = """
import json, logging, sys, time
from pathlib import Path
import torch
from pipeline.checkpoint import Checkpoint
from pipeline.proposer import build_model, train_proposer
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO)
coco_json, root, block_at, run = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
seen = []
def log_step(step, record):
    seen.append(step)
    if step == block_at:
        Path("blocked").write_text(str(step))
        time.sleep(300)
torch.manual_seed(0)
model = build_model("resnet18", 64)
history = train_proposer(model, coco_json, root, device="cpu", progress=False, log_step=log_step,
                         checkpoint=Checkpoint("train_proposer", {"run": 1}), checkpoint_every=3, **run)
torch.save(model.state_dict(), "final.pt")
Path("history.json").write_text(json.dumps({"history": list(history), "seen": seen,
                                            "resumed_from": history.resumed_from}))
"""


def _train(path, root, **kw):
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE)
    seen = []
    history = train_proposer(
        model, path, root, device="cpu", progress=False, log_step=lambda step, _: seen.append(step), **{**RUN, **kw}
    )
    return model.state_dict(), history, seen


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def uninterrupted(world):
    path, root = world
    return _train(path, root)


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("n", "batch_size"), [(6, 2), (7, 2), (7, 3), (7, 7), (5, 1)])
def test_epoch_batches_are_a_shuffled_dataloader_s(n, batch_size):
    """Draw for draw the batches (and generator states) of DataLoader(shuffle=True); `skip` starts mid-epoch."""
    data = list(range(n))
    reference = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(4)
    )
    gen = torch.Generator().manual_seed(4)
    batches = _EpochBatches(n, batch_size, gen)
    ours = torch.utils.data.DataLoader(data, batch_sampler=batches, generator=gen)
    assert len(ours) == len(reference)
    for _ in range(3):
        start = gen.get_state()
        expected = [b.tolist() for b in reference]
        assert [b.tolist() for b in ours] == expected
        assert torch.equal(gen.get_state(), reference.generator.get_state())
        end = gen.get_state()
        for skip in range(len(expected)):  # resume at every batch of the epoch
            gen.set_state(start)
            batches.skip = skip
            assert [b.tolist() for b in ours] == expected[skip:]
            assert torch.equal(gen.get_state(), end)


def test_training_resumes_after_sigkill_with_the_same_weights(world, uninterrupted, tmp_path):
    path, root = world
    ref_state, ref_history, _ = uninterrupted
    argv = [sys.executable, "-c", _KILLABLE, str(path), str(root), "4", json.dumps(RUN)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = tmp_path / "checkpoints" / "train_proposer" / "state.pt"
    deadline = time.monotonic() + 120
    try:
        while not (tmp_path / "blocked").exists():  # steps 0-4 done, the checkpoint of step 3 written
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached step 4"
            time.sleep(0.05)
        saved = torch.load(state_file, weights_only=False)
        assert saved["state"]["step"] == 3  # mid-epoch (epoch 1, after its first batch)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "final.pt").exists()
    (tmp_path / "blocked").unlink()
    done = subprocess.run(argv[:5] + ["-1", argv[6]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from step 3 of 8" in done.stderr  # logged when it resumes
    _assert_same_weights(torch.load(tmp_path / "final.pt", weights_only=True), ref_state)
    result = json.loads((tmp_path / "history.json").read_text())
    assert result["resumed_from"] == 3
    assert result["seen"] == list(range(8))  # the saved steps are logged again, then the new ones
    assert result["history"] == list(ref_history)


def test_training_resumes_at_an_epoch_boundary_with_complete_history(world, uninterrupted, tmp_path):
    path, root = world
    ref_state, ref_history, _ = uninterrupted
    checkpoint = Checkpoint("train_proposer", {"run": 2}, root=tmp_path)

    def stop_at_7(step, _):
        if step == 7:
            raise _Stop

    torch.manual_seed(0)
    with pytest.raises(_Stop):
        train_proposer(build_model("resnet18", SIZE), path, root, device="cpu", progress=False, log_step=stop_at_7,
                       checkpoint=checkpoint, checkpoint_every=3, **RUN)  # fmt: skip
    assert checkpoint.load()["step"] == 6  # the end of epoch 2 (2 batches per epoch)
    state, history, seen = _train(path, root, checkpoint=checkpoint, checkpoint_every=3)
    assert history.resumed_from == 6
    assert seen == list(range(8)) and len(history) == 8
    assert list(history) == list(ref_history)  # every step's losses and lr, the saved ones included
    _assert_same_weights(state, ref_state)


def test_a_checkpoint_of_another_key_is_ignored(world, uninterrupted, tmp_path):
    path, root = world
    ref_state, ref_history, _ = uninterrupted

    def stop_at_2(step, _):
        if step == 2:
            raise _Stop

    torch.manual_seed(0)
    with pytest.raises(_Stop):
        train_proposer(build_model("resnet18", SIZE), path, root, device="cpu", progress=False, log_step=stop_at_2,
                       checkpoint=Checkpoint("train_proposer", {"lr": 0.5}, root=tmp_path), checkpoint_every=2,
                       **RUN)  # fmt: skip
    other = Checkpoint("train_proposer", {"lr": 0.01}, root=tmp_path)
    assert other.path.is_file() and other.load() is None  # same file, another key: not resumed from
    state, history, _ = _train(path, root, epochs=1, checkpoint=other, checkpoint_every=100)
    assert history.resumed_from == 0 and len(history) == 2
    assert list(history) == list(ref_history)[:2]  # started from scratch: the same first steps as a fresh run


def test_checkpoint_key_covers_what_changes_training():
    from stages.train_proposer import checkpoint_key

    manifest = Manifest(
        source="synthetic", train_json="t.json", val_json="v.json", image_root="img", proposer_json="p.json",
        base_category_ids=[1], files={"p.json": "abc"}, proposer_excluded_image_ids=[3, 1],
    )  # fmt: skip
    base = checkpoint_key(Params(), manifest, "cpu")
    other_grad = "torchvision" if Proposer().roi_align_grad == "sparse" else "sparse"
    assert checkpoint_key(Params(proposer=Proposer(checkpoint_every=7)), manifest, "cpu") == base
    assert checkpoint_key(Params(seed=1), manifest, "cpu") == base  # the global seed makes the data, not the training
    assert checkpoint_key(Params(), manifest, "cpu", world_size=1) == base
    changed = [
        checkpoint_key(Params(proposer=Proposer(lr=0.5)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(epochs=2)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(seed=1)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(roi_align_grad=other_grad)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(fpn_channels=64)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(rois_per_image=16)), manifest, "cpu"),
        checkpoint_key(Params(), manifest, "cpu", world_size=2),  # each rank's RNG state is saved
        checkpoint_key(Params(), manifest, "cuda"),
        checkpoint_key(Params(), Manifest(**{**manifest.__dict__, "files": {"p.json": "abd"}}), "cpu"),
        checkpoint_key(Params(), Manifest(**{**manifest.__dict__, "proposer_excluded_image_ids": [1]}), "cpu"),
        checkpoint_key(Params(), Manifest(**{**manifest.__dict__, "proposer_image_root": "coco"}), "cpu"),
    ]
    assert all(key != base for key in changed)


def test_excluded_images_are_left_out(world, tmp_path):
    """LVIS val images (listed in the manifest) are never loaded: here their files do not even exist."""
    path, root = world
    data = json.loads(path.read_text())
    data["images"].append({"id": 77, "file_name": "missing/77.png", "height": SIZE, "width": SIZE})
    data["annotations"].append(
        {"id": 500, "image_id": 77, "category_id": 1, "bbox": [2, 2, 20, 20], "segmentation": [[2, 2, 22, 2, 22, 22]],
         "iscrowd": 0}
    )  # fmt: skip
    with_missing = tmp_path / "coco.json"
    with_missing.write_text(json.dumps(data))
    dataset = CocoInstances(with_missing, root, exclude_image_ids=[77, 2, 12345])
    assert len(dataset) == 5 and dataset.n_excluded == 2  # 12345 is not in the file
    assert {dataset[i][1]["image_id"] for i in range(len(dataset))} == {1, 3, 4, 5, 6}
    torch.manual_seed(0)
    history = train_proposer(build_model("resnet18", SIZE), with_missing, root, epochs=1, batch_size=3, lr=0.01,
                             seed=0, device="cpu", progress=False, exclude_image_ids=[77, 2])  # fmt: skip
    assert len(history) == 2 and history.n_images == 5 and history.n_excluded == 2
    with pytest.raises(PipelineError, match="77.png"):  # without the exclusion, the missing file is read
        train_proposer(build_model("resnet18", SIZE), with_missing, root, epochs=1, batch_size=7, lr=0.01,
                       seed=0, device="cpu", progress=False)  # fmt: skip


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


def _records(world) -> tuple[list[dict], Path]:
    path, root = world
    records = json.loads(path.read_text())["images"][:6]
    return records + [{"id": 77, "file_name": "train/missing.png", "height": SIZE, "width": SIZE}], root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_propose_split_with_workers_is_the_in_process_split(world, num_workers):
    from pipeline.proposals import propose_split

    records, root = _records(world)
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


# --------------------------------------------------------------------------------------------------
# the sparse RoIAlign gradient, the FPN width, the RoI budget


def _pools(output_size: int) -> tuple[MultiScaleRoIAlign, SparseGradRoIAlign]:
    reference = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)
    sparse = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)
    sparse.__class__ = SparseGradRoIAlign
    sparse.sparse_grad = True
    return reference, sparse


@pytest.mark.parametrize("output_size", [7, 14])
def test_sparse_roi_align_gradient_is_torchvision_s(output_size):
    """Forward: torchvision's values exactly; backward: its gradient to float rounding, at every FPN level,
    for RoIs at the image's edges, under a pixel and over the whole image."""
    gen = torch.Generator().manual_seed(output_size)
    features = {str(i): torch.randn(3, 8, 256 // 2**i, 192 // 2**i, generator=gen) for i in range(4)}
    xy = torch.rand(60, 2, generator=gen) * torch.tensor([760.0, 1010.0])
    wh = torch.rand(60, 2, generator=gen) ** 3 * 1000 + 0.2
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([768.0, 1024.0]))], 1)
    boxes[:3] = torch.tensor([[0.0, 0.0, 768.0, 1024.0], [767.5, 1023.5, 768.0, 1024.0], [0.0, 0.0, 0.3, 0.3]])
    boxes = [boxes[:25], boxes[25:26], boxes[26:]]
    shapes = [(1024, 768)] * 3
    reference, sparse = _pools(output_size)
    ours = {k: v.clone().requires_grad_() for k, v in features.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in features.items()}
    out, expected = sparse(ours, boxes, shapes), reference(theirs, boxes, shapes)
    assert torch.equal(out, expected)
    grad = torch.randn(expected.shape, generator=gen)
    out.backward(grad)
    expected.backward(grad)
    for level in features:
        assert theirs[level].grad.abs().max() > 0, level  # every level pooled something
        torch.testing.assert_close(ours[level].grad, theirs[level].grad, rtol=0, atol=1e-4)
    with torch.no_grad():  # inference and a module left off are torchvision's own
        assert torch.equal(sparse(features, boxes, shapes), reference(features, boxes, shapes))


def test_sparse_and_torchvision_gradients_train_alike(world):
    """`roi_align_grad`: the whole model's gradient of one step is torchvision's to float rounding, and training
    with either starts from the same losses (the forward is the same)."""
    path, root = world
    data = CocoInstances(path, root)
    images, targets = (list(x) for x in zip(*(data[i] for i in range(3)), strict=True))
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE).train()
    grads = {}
    for sparse in (True, False):
        for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
            pool.sparse_grad = sparse
        torch.manual_seed(1)  # the same RoI samples
        model.zero_grad()
        sum(model(images, targets).values()).backward()
        grads[sparse] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, expected in grads[False].items():
        scale = float(expected.abs().max())
        assert (grads[True][name] - expected).abs().max() <= 1e-4 * scale + 1e-9, name
    first = {}
    for grad in ("sparse", "torchvision"):
        torch.manual_seed(0)
        model = build_model("resnet18", SIZE)
        first[grad] = train_proposer(model, path, root, epochs=1, batch_size=2, lr=0.01, seed=3, device="cpu",
                                     progress=False, roi_align_grad=grad)[0]  # fmt: skip
        assert not any(p.sparse_grad for p in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool))
    assert first["sparse"] == first["torchvision"]
    with pytest.raises(PipelineError, match="roi_align_grad"):
        train_proposer(build_model("resnet18", SIZE), path, root, epochs=1, batch_size=2, lr=0.01, seed=0,
                       device="cpu", progress=False, roi_align_grad="cuda")  # fmt: skip


def test_fpn_width_and_roi_budget(world, tmp_path):
    path, root = world
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, fpn_channels=64)
    assert model.backbone.out_channels == 64 and model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7
    train_proposer(model, path, root, epochs=1, batch_size=3, lr=0.01, seed=0, device="cpu", progress=False,
                   rois_per_image=16)  # fmt: skip
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    saved = tmp_path / "p.pt"
    save_checkpoint(model, saved, "resnet18", SIZE)
    assert torch.load(saved, weights_only=True)["fpn_channels"] == 64  # absent at 256: older files keep their bytes
    images = [_image(1)]
    loaded = load_checkpoint(saved, "resnet18", SIZE)
    for a, b in zip(propose(model, images, device="cpu"), propose(loaded, images, device="cpu"), strict=True):
        np.testing.assert_array_equal(a["masks"], b["masks"])
    with pytest.raises(PipelineError, match="resnet"):
        build_model("mobilenet_v3", SIZE, fpn_channels=64)


# --------------------------------------------------------------------------------------------------
# ranks: the global batch split, DDP under torchrun


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_global_batch_is_split_across_the_ranks(world_size):
    for m in range(1, 9):
        shares = [_share(m, r, world_size) for r in range(world_size)]
        assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(m))
        assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1
    n, batch = 11, 6  # batches of 6 and 5
    one = list(_EpochBatches(n, batch, torch.Generator().manual_seed(1)))
    per_rank = [
        list(_EpochBatches(n, batch, torch.Generator().manual_seed(1), r, world_size)) for r in range(world_size)
    ]
    for b, batch_images in enumerate(one):
        shares = [_share(len(batch_images), r, world_size) for r in range(world_size)]
        got = [per_rank[r][b] for r in range(world_size)]
        assert [i for (lo, hi), g in zip(shares, got, strict=True) if hi > lo for i in g] == batch_images
        assert all(g == batch_images[:1] for (lo, hi), g in zip(shares, got, strict=True) if hi == lo)  # placeholder


def test_the_global_batch_must_split_evenly(world):
    path, root = world
    with pytest.raises(PipelineError, match="global batch.*multiple of 2"):
        train_proposer(build_model("resnet18", SIZE), path, root, epochs=1, batch_size=3, lr=0.01, seed=0,
                       device="cpu", progress=False, ranks=Ranks(0, 2, 0))  # fmt: skip


def _torchrun_workspace(tmp_path: Path) -> Path:
    from tests.test_e2e import TINY, copy_repo

    tiny = {**TINY, "data.synthetic.n_train": 16, "data.synthetic.n_val": 4, "data.synthetic.n_categories": 8,
            "data.synthetic.max_objects": 3, "proposer.epochs": 3, "proposer.checkpoint_every": 2}  # fmt: skip
    repo = copy_repo(tmp_path / "repo", tiny, "tiny")
    done = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return repo


def test_torchrun_trains_one_model_and_a_killed_run_resumes_to_it(tmp_path):
    """`torchrun --standalone --nproc_per_node 2 -m stages.train_proposer` (gloo, CPU): DDP over the split global
    batch, rank 0 alone writes models/proposer.pt, dvclive and the summary; a 2-rank run (`dist.nproc: 2`) whose
    rank 1 is killed after a checkpoint resumes, with the same command, to the uninterrupted run's bytes."""
    from tests.test_e2e import params_with, rank_pid

    repo = _torchrun_workspace(tmp_path)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, "-m", "stages.train_proposer"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("[train_proposer]") == 1 and "with 2 ranks" in output  # rank 0's summary only
    reference = (repo / "models/proposer.pt").read_bytes()
    state = repo / "checkpoints/train_proposer/state.pt"
    assert not state.exists()  # cleared once the model is written
    metrics = json.loads((repo / "dvclive/train_proposer/metrics.json").read_text())
    steps = metrics["steps"]
    assert steps == 3 * -(-metrics["train_images"] // 4)  # 3 epochs of global batches of 4
    (repo / "models/proposer.pt").unlink()

    cmd = [sys.executable, "-m", "stages.train_proposer", "--params-file", params_with(repo, "two.yaml", dist__nproc=2)]
    with open(tmp_path / "killed.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 300
    try:
        while not state.exists():  # rank 0 saved step 2's checkpoint
            assert proc.poll() is None, (tmp_path / "killed.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        victim = rank_pid(1, repo)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=120) == 1
    finally:
        proc.kill()
    assert "rank 1 of 2 was killed by SIGKILL" in (tmp_path / "killed.txt").read_text()
    assert not (repo / "models/proposer.pt").exists()
    at = int(torch.load(state, weights_only=False)["state"]["step"])
    assert 2 <= at < steps
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"resumed from step {at} of {steps}" in done.stderr
    assert (repo / "models/proposer.pt").read_bytes() == reference
    assert not state.exists()
