"""Crops (geometry, padding, masking) and the frozen backbone (init, loading, errors, pooling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from pipeline.errors import PipelineError
from pipeline.models.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    crop_views,
    extract_image,
    pool_features,
    square_crop_boxes,
)

torch.set_num_threads(1)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


# ------------------------------------------------------------------------------------------- geometry


def test_square_crop_of_wide_and_tall_boxes():
    boxes = np.array([[10, 20, 50, 30], [5, 0, 9, 30], [3, 3, 3, 3]], dtype=np.float32)
    sq = square_crop_boxes(boxes)
    torch.testing.assert_close(sq[0], torch.tensor([10.0, 5.0, 50.0, 45.0]))  # wide: side 40
    torch.testing.assert_close(sq[1], torch.tensor([-8.0, 0.0, 22.0, 30.0]))  # tall: side 30, leaves the image
    torch.testing.assert_close(sq[2], torch.tensor([2.5, 2.5, 3.5, 3.5]))  # degenerate: one pixel


def test_border_box_is_zero_padded_in_the_right_region():
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    masks = np.ones((2, 32, 32), dtype=bool)
    # wide box at the top: square rows -4..28 -> crop rows 0..3 lie above the image
    # tall box at the right: square columns 14..46 -> crop columns 18..31 lie right of the image
    boxes = np.array([[0, 0, 32, 24], [28, 0, 32, 32]], dtype=np.float32)
    box_view, fg, bg = crop_views(image, boxes, masks, 32)
    top = box_view[0]
    assert torch.all(top[:, :4] == 0)
    torch.testing.assert_close(top[:, 4:], torch.ones_like(top[:, 4:]))
    right = box_view[1]
    assert torch.all(right[:, :, 18:] == 0)
    torch.testing.assert_close(right[:, :, :18], torch.ones_like(right[:, :, :18]))
    torch.testing.assert_close(fg, box_view)
    assert torch.all(bg == 0)


def test_box_inside_equals_slice_and_resize():
    image = smooth_image(64, 64)
    chw = to_chw(image)
    masks = np.ones((2, 64, 64), dtype=bool)
    boxes = np.array([[16, 8, 40, 32], [0, 16, 32, 48]], dtype=np.float32)  # squares of side 24 and 32
    up, _, _ = crop_views(image, boxes[:1], masks[:1], 48)  # enlarge x2: bilinear
    ref_up = F.interpolate(chw[None, :, 8:32, 16:40], size=48, mode="bilinear", align_corners=False)
    # roi_align reads the neighbours just outside the slice at the crop's edge; the interior must agree
    torch.testing.assert_close(up[:, :, 1:-1, 1:-1], ref_up[:, :, 1:-1, 1:-1], atol=1e-5, rtol=0)
    assert (up - ref_up).abs().mean() < 0.02
    down, _, _ = crop_views(image, boxes[1:], masks[1:], 16)  # shrink x2: mean of 2x2 pixels
    ref_down = F.avg_pool2d(chw[None, :, 16:48, 0:32], 2)
    torch.testing.assert_close(down, ref_down, atol=1e-5, rtol=0)


def test_fg_plus_bg_is_box_and_masking_happens_in_pixel_space():
    image = smooth_image(40, 50, seed=1)
    rng = np.random.default_rng(2)
    masks = rng.random((3, 40, 50)) > 0.5
    boxes = np.array([[5, 5, 25, 15], [0, 30, 50, 40], [40, 0, 49, 39]], dtype=np.float32)
    box_view, fg, bg = crop_views(image, boxes, masks, 24)
    assert box_view.shape == fg.shape == bg.shape == (3, 3, 24, 24)
    assert box_view.dtype == torch.float32
    torch.testing.assert_close(fg + bg, box_view, atol=1e-5, rtol=0)  # float32 rounding of a + b
    for k in range(3):  # fg / bg are the crops of the image multiplied by the mask / its complement
        fg_img = (image * masks[k][..., None]).astype(np.uint8)
        bg_img = (image * ~masks[k][..., None]).astype(np.uint8)
        torch.testing.assert_close(crop_views(fg_img, boxes[k : k + 1], masks[k : k + 1], 24)[0][0], fg[k])
        torch.testing.assert_close(crop_views(bg_img, boxes[k : k + 1], masks[k : k + 1], 24)[0][0], bg[k])
    assert fg.min() >= 0 and bg.min() >= 0 and box_view.max() <= 1


def test_empty_and_bad_inputs():
    image = smooth_image(8, 8)
    views = crop_views(image, np.zeros((0, 4)), np.zeros((0, 8, 8), bool), 16)
    assert all(v.shape == (0, 3, 16, 16) for v in views)
    with pytest.raises(PipelineError):
        crop_views(image, np.zeros((1, 4)), np.zeros((1, 9, 8), bool), 16)
    with pytest.raises(PipelineError):
        crop_views(image.astype(np.float32), np.zeros((1, 4)), np.zeros((1, 8, 8), bool), 16)


# ------------------------------------------------------------------------------------------- backbone


@pytest.fixture(scope="module")
def r18():
    return build_backbone("resnet18", "random", seed=0)


def test_backbone_frozen_and_deterministic(r18):
    assert not r18.training
    assert not any(p.requires_grad for p in r18.parameters())
    r18.train()
    assert not r18.training and not any(m.training for m in r18.modules())
    state = torch.random.get_rng_state()
    again = build_backbone("resnet18", "random", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    other = build_backbone("resnet18", "random", seed=1)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(r18(x), again(x), atol=0, rtol=0)
        assert not torch.allclose(r18(x), other(x))


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_feature_dim(name, dim):
    bb = build_backbone(name, "random", seed=0)
    assert bb.dim == dim
    out = pool_features(bb, torch.rand(3, 3, 32, 32), batch_size=2, device="cpu")
    assert out.shape == (3, dim) and out.dtype == np.float32


def test_pool_features_batching_invariant(r18):
    views = torch.rand(5, 3, 32, 32)
    a = pool_features(r18, views, batch_size=5, device="cpu")
    b = pool_features(r18, views, batch_size=2, device="cpu")
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert pool_features(r18, views[:0], batch_size=2, device="cpu").shape == (0, 512)


@pytest.fixture(scope="module")
def maskrcnn():
    torch.manual_seed(0)
    model = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None), num_classes=2)
    gen = torch.Generator().manual_seed(1)
    for name, buf in model.backbone.body.named_buffers():  # non-trivial FrozenBatchNorm2d statistics
        if name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
        else:
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def test_proposer_init_loads_maskrcnn_body(maskrcnn, tmp_path):
    path = tmp_path / "proposer.pt"
    torch.save({"state_dict": maskrcnn.state_dict(), "backbone": "resnet18", "epochs": 1}, path)
    bb = build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=path)
    assert torch.equal(bb.resnet.conv1.weight, maskrcnn.backbone.body.conv1.weight)
    assert torch.equal(bb.resnet.layer4[1].bn2.running_var, maskrcnn.backbone.body.layer4[1].bn2.running_var)
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        ref = maskrcnn.backbone.body((x - mean) / std)["3"].mean(dim=(2, 3))
        torch.testing.assert_close(bb(x), ref, atol=1e-4, rtol=1e-4)
    # a DistributedDataParallel-prefixed state dict loads too (body keys only: keeps the test fast)
    ddp = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in body_state(maskrcnn).items()}, "backbone": "resnet18"}, ddp)
    bb2 = build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=ddp)
    assert torch.equal(bb2.resnet.conv1.weight, bb.resnet.conv1.weight)


def body_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}


def test_proposer_init_errors(maskrcnn, tmp_path):
    state = body_state(maskrcnn)
    wrong = tmp_path / "wrong_backbone.pt"
    torch.save(
        {"state_dict": {"backbone.body.conv1.weight": state["backbone.body.conv1.weight"]}, "backbone": "resnet50"},
        wrong,
    )
    with pytest.raises(PipelineError, match="wrong_backbone.pt.*resnet50"):
        build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=wrong)
    missing = tmp_path / "missing_key.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "backbone.body.layer2.0.conv1.weight"},
                "backbone": "resnet18"}, missing)  # fmt: skip
    with pytest.raises(PipelineError, match="missing_key.pt.*layer2.0.conv1.weight"):
        build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=missing)
    with pytest.raises(PipelineError, match="nope.pt"):
        build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=tmp_path / "nope.pt")
    with pytest.raises(PipelineError):
        build_backbone("resnet18", "proposer", seed=0)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PipelineError, match="garbage.pt"):
        build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"backbone.body.conv1.weight": state["backbone.body.conv1.weight"]}, plain)
    with pytest.raises(PipelineError, match="plain.pt"):
        build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=plain)


def test_path_init_strict(tmp_path):
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    good = tmp_path / "resnet18-test.pth"
    torch.save(ref.state_dict(), good)
    bb = build_backbone("resnet18", str(good), seed=0)
    assert torch.equal(bb.resnet.layer3[0].downsample[0].weight, ref.layer3[0].downsample[0].weight)
    assert bb.init == str(good)
    state = ref.state_dict()
    extra = tmp_path / "extra-key.pth"  # e.g. a resnet50 file: bottleneck keys resnet18 lacks
    torch.save({"conv1.weight": state["conv1.weight"], "layer1.0.conv3.weight": torch.zeros(1)}, extra)
    with pytest.raises(PipelineError, match="extra-key.pth.*unexpected.*layer1.0.conv3.weight"):
        build_backbone("resnet18", extra, seed=0)
    shape = tmp_path / "bad-shape.pth"
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, shape)
    with pytest.raises(PipelineError, match="bad-shape.pth.*conv1.weight"):
        build_backbone("resnet18", shape, seed=0)
    with pytest.raises(PipelineError, match="unknown backbone"):
        build_backbone("vgg16", "random", seed=0)


# ---------------------------------------------------------------------------------------- one image


def test_extract_image(r18):
    image = smooth_image(48, 64, seed=4)
    boxes = np.array([[4, 4, 30, 20], [10, 0, 60, 47]], dtype=np.float32)
    masks_mxm = np.full((2, 14, 14), 255, dtype=np.uint8)
    out = extract_image(image, boxes, masks_mxm, r18, 32, "cpu")
    assert set(out) == {"box", "fg", "bg"}
    assert all(v.shape == (2, 512) and v.dtype == np.float32 for v in out.values())
    from pipeline.geometry.paste import paste_masks

    full = paste_masks(masks_mxm, boxes, (48, 64))
    views = crop_views(image, boxes, full, 32)
    for key, view in zip(("box", "fg", "bg"), views, strict=True):
        np.testing.assert_allclose(out[key], pool_features(r18, view, 8, "cpu"), atol=1e-4)
    again = extract_image(image, boxes, None, r18, 32, "cpu", full_masks=full, batch_size=2)
    np.testing.assert_allclose(again["fg"], out["fg"], atol=1e-4)
    empty = extract_image(image, np.zeros((0, 4)), np.zeros((0, 14, 14), np.uint8), r18, 32, "cpu")
    assert all(v.shape == (0, 512) for v in empty.values())


# ------------------------------------------------------------------------- batched crops, whole splits


def _random_scene(seed: int, height: int, width: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image, n boxes of every kind (inside, across the border, tiny, the whole image, squares that leave
    the image) and masks that are random blobs, noise, empty or full."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    x0, y0 = rng.uniform(-0.2 * width, width, n), rng.uniform(-0.2 * height, height, n)
    w, h = rng.uniform(0.2, 1.1 * width, n), rng.uniform(0.2, 1.1 * height, n)
    tiny = rng.random(n) < 0.2
    w, h = np.where(tiny, rng.uniform(0, 1, n), w), np.where(tiny, rng.uniform(0, 1, n), h)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)
    boxes[0] = [0, 0, width, height]
    boxes[1] = [width - 2, 0, width, height]  # a tall strip: its square leaves the image to the right
    masks = rng.random((n, height, width)) < rng.uniform(0, 1, (n, 1, 1))
    masks[2] = False
    masks[3] = True
    return image, boxes, masks


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("hw", "size"), [((64, 64), 32), ((45, 97), 64), ((130, 70), 48)])
def test_batched_crops_are_the_per_proposal_loop_bit_for_bit(seed, hw, size):
    image, boxes, masks = _random_scene(seed, *hw, n=24)
    batched = crop_views(image, boxes, masks, size, batched=True)
    loop = crop_views(image, boxes, masks, size, batched=False)
    for got, want, default in zip(batched, loop, crop_views(image, boxes, masks, size), strict=True):
        assert torch.equal(got, want) and torch.equal(default, want)  # the CPU's default: the loop


def test_batched_crops_in_chunks_and_squares_off_the_image(monkeypatch):
    import pipeline.models.features as features

    image, boxes, masks = _random_scene(9, 40, 50, n=12)
    boxes[4] = [-30, -30, -10, -10]  # the square misses the image: zero views
    boxes[5] = [55, 10, 70, 20]
    whole = crop_views(image, boxes, masks, 32, batched=True)
    assert torch.all(whole[1][4] == 0) and torch.all(whole[1][5] == 0)
    monkeypatch.setattr(features, "_WINDOW_PIXELS", 2 * 52 * 52)  # two windows per chunk at most
    for got, want in zip(crop_views(image, boxes, masks, 32, batched=True), whole, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(crop_views(image, boxes, masks, 32, batched=False), whole, strict=True):
        assert torch.equal(got, want)


def test_pool_features_under_autocast(r18):
    views = torch.rand(6, 3, 32, 32)
    full = pool_features(r18, views, 4, "cpu")
    for amp in ("bf16", "fp16"):
        try:
            mixed = pool_features(r18, views, 4, "cpu", amp=amp)
        except PipelineError as err:  # a torch build without that CPU autocast says so in one line
            assert amp in str(err)
            continue
        assert mixed.dtype == np.float32 and mixed.shape == full.shape
        assert np.abs(mixed - full).max() <= 0.05 * np.abs(full).max()
    with pytest.raises(PipelineError, match="amp"):
        pool_features(r18, views, 4, "cpu", amp="fp8")


def _split_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(48, 56, 3), dtype=np.uint8) for _ in range(7)]
    counts = [3, 0, 5, 1, 0, 4, 2]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    x0, y0 = rng.uniform(0, 40, n), rng.uniform(0, 30, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(2, 16, n), y0 + rng.uniform(2, 18, n)], 1).astype(np.float32)
    masks = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    masks[::2] = np.where(masks[::2] > 100, 200, 20)  # blocky maps: overlapping masks
    boxes[[0, 2]] = [[2, 2, 40, 40], [8, 8, 30, 30]]  # image 0: full maps, one box inside another, a (parent, child)
    masks[[0, 2]] = 255
    boxes[1] = [4, 4, 38, 39]  # nearly the parent: an object pair
    masks[1] = 255
    hw = np.array([img.shape[:2] for img in images])
    return images, hw, offsets, boxes, masks


@pytest.mark.parametrize(("vectorised", "num_workers"), [(False, 0), (True, 2)])
def test_sample_split_is_the_same_vectorised_and_with_workers(r18, vectorised, num_workers):
    from pipeline.stores.sampling import sample_split

    images, hw, offsets, boxes, masks = _split_inputs()
    read = []

    def load(i: int) -> np.ndarray:
        read.append(i)
        return images[i]

    kw = {"crop_size": 32, "object_iou": 0.1, "hier_containment": 0.8, "relation_max_side": None, "batch_size": 5}
    base = sample_split(load, hw, offsets, boxes, masks, r18, progress=False, **kw)
    assert read == [0, 2, 3, 5, 6]  # images without proposals are not read
    other = sample_split(
        load, hw, offsets, boxes, masks, r18, progress=False, vectorised=vectorised, num_workers=num_workers, **kw
    )
    assert len(base.object_pairs) and len(base.hier_pairs)
    assert np.array_equal(base.object_pairs, other.object_pairs)
    assert np.array_equal(base.hier_pairs, other.hier_pairs)
    for view in ("box", "fg", "bg"):
        assert np.array_equal(base.features[view], other.features[view])


def test_sample_split_worker_errors_are_the_stage_s_own(r18, tmp_path):
    """A read error, with workers or without, is the stage's one-line error; in `sample_parts` the parts before
    it stay on disk."""
    from pipeline.stores.parts import ImageParts
    from pipeline.stores.sampling import PAIR_COLUMNS, sample_columns, sample_parts, sample_split

    images, hw, offsets, boxes, masks = _split_inputs()

    def load(i: int) -> np.ndarray:
        if i == 5:
            raise PipelineError("image 5: file not found")
        return images[i]

    kw = {"crop_size": 32, "object_iou": 0.4, "hier_containment": 1.0, "relation_max_side": None, "batch_size": 8}
    proposals = {"image_offsets": offsets, "image_hw": hw, "boxes": boxes, "masks": masks}
    for workers in (0, 2):
        with pytest.raises(PipelineError, match=r"^image 5: file not found$"):
            sample_split(load, hw, offsets, boxes, masks, r18, progress=False, num_workers=workers, **kw)
        columns = sample_columns(r18.dim, "float32")
        out = tmp_path / f"workers{workers}.zarr"
        parts = ImageParts(out, {}, columns, len(images), images_per_part=2, index_columns=PAIR_COLUMNS)
        with pytest.raises(PipelineError, match=r"^image 5: file not found$"):
            sample_parts(parts, proposals, load, r18, dtype="float32", progress=False, num_workers=workers, **kw)
        assert [parts.done(*r) for r in parts.ranges] == [True, True, False, False]  # image 5 is in [4, 6)


def test_sample_parts_read_every_part_through_one_set_of_workers(r18, tmp_path):
    """Across the parts of a split the images are decoded by one set of workers (not a new set per part, each
    fork of a CUDA process costing about 0.13 s), into the same store as without workers, on one rank or two;
    parts without proposals read nothing."""
    import os

    from pipeline.stores.parts import ImageParts
    from pipeline.stores.sampling import PAIR_COLUMNS, sample_columns, sample_parts, sample_split
    from pipeline.stores.store import open_store, read_array

    images, hw, offsets, boxes, masks = _split_inputs()
    proposals = {"image_offsets": offsets, "image_hw": hw, "boxes": boxes, "masks": masks}
    reads = tmp_path / "reads.txt"

    def load(i: int) -> np.ndarray:
        with reads.open("a") as log:  # which process read which image
            log.write(f"{os.getpid()} {i}\n")
        return images[i]

    kw = {"crop_size": 32, "object_iou": 0.1, "hier_containment": 0.8, "relation_max_side": None, "batch_size": 5}
    whole = sample_split(lambda i: images[i], hw, offsets, boxes, masks, r18, progress=False, **kw)
    stores = {}
    for workers, ranks in ((0, 1), (2, 1), (2, 2)):
        reads.write_text("")
        out = tmp_path / f"workers{workers}_ranks{ranks}.zarr"
        columns = sample_columns(r18.dim, "float32")
        parts = ImageParts(out, {}, columns, len(images), images_per_part=1, index_columns=PAIR_COLUMNS)
        for rank in range(ranks):  # the ranks one after the other: each its own share of the 7 parts
            sample_parts(
                parts,
                proposals,
                load,
                r18,
                dtype="float32",
                progress=False,
                num_workers=workers,
                rank=rank,
                world_size=ranks,
                **kw,
            )
        log = [line.split() for line in reads.read_text().splitlines()]
        assert sorted(int(i) for _, i in log) == [0, 2, 3, 5, 6]  # images 1 and 4 (parts of their own) not read
        pids = {int(pid) for pid, _ in log}
        if workers:  # a set per part would be up to 5 processes
            assert os.getpid() not in pids and len(pids) <= workers * ranks
        else:
            assert pids == {os.getpid()}
        parts.assemble({}, kind="samples")
        stores[workers, ranks] = open_store(out, "samples")
    names = ("features/box", "features/fg", "features/bg", "pairs/object", "pairs/hier", "image_offsets")
    for name in names:
        assert np.array_equal(read_array(stores[0, 1], name), read_array(stores[2, 1], name)), name
        assert np.array_equal(read_array(stores[0, 1], name), read_array(stores[2, 2], name)), name
    assert np.array_equal(read_array(stores[2, 1], "pairs/object"), whole.object_pairs)
    assert np.array_equal(read_array(stores[2, 1], "pairs/hier"), whole.hier_pairs)
