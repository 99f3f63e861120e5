"""`pipeline.models.cpu_paths`: the RPN's per-image filtering on threads and the channels-last stem max-pool give
torchvision's outputs bit for bit, alone and inside the proposer (a training step's losses and gradients, and
inference) and the feature backbone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.rpn import RegionProposalNetwork

from pipeline.models import cpu_paths
from pipeline.models.cpu_paths import ChannelsLastMaxPool2d, ThreadedRPN, map_on_threads
from pipeline.models.features import build_backbone
from pipeline.models.proposer import build_model


@pytest.fixture
def two_threads():
    """torch's intra-op threads at 2 (other test modules set 1), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _as_torchvision(model: nn.Module) -> nn.Module:
    """A copy of a proposer whose RPN and stem max-pool are torchvision's own classes again."""
    reference = copy.deepcopy(model)
    reference.rpn.__class__ = RegionProposalNetwork
    reference.backbone.body.maxpool.__class__ = nn.MaxPool2d
    return reference


def _rpn_inputs(images: int, seed: int) -> tuple:
    """Decoded proposals and objectness as the RPN's forward hands them to filter_proposals: 5 levels of a 64 px
    image, boxes from a few pixels (some under min_size after clipping) to past the image."""
    gen = torch.Generator().manual_seed(seed)
    per_level = [48 * 48 * 3 // 4**i + 3 for i in range(5)]
    total = sum(per_level)
    xy = torch.rand(images, total, 2, generator=gen) * 80 - 8
    wh = torch.rand(images, total, 2, generator=gen) ** 4 * 60
    proposals = torch.cat([xy, xy + wh], 2)
    objectness = torch.randn(images * total, 1, generator=gen) * 3
    objectness[::7] = objectness[3]  # ties in the scores
    return proposals, objectness, [(64, 64)] * images, per_level


@pytest.mark.parametrize("training", [True, False])
def test_threaded_filtering_is_torchvision_s(two_threads, training):
    model = build_model("resnet18", 128, fpn_channels=32)
    rpn = model.rpn
    assert isinstance(rpn, ThreadedRPN)
    rpn.train(training)
    rpn._pre_nms_top_n = {"training": 700, "testing": 300}
    rpn._post_nms_top_n = {"training": 500, "testing": 100}
    for images, seed in ((1, 0), (4, 1), (5, 2)):
        args = _rpn_inputs(images, seed)
        cpu_paths._POOL = None
        boxes, scores = rpn.filter_proposals(*args)
        assert (cpu_paths._POOL is not None) == (images > 1)  # more than one image: on the threads
        ref_boxes, ref_scores = RegionProposalNetwork.filter_proposals(rpn, *args)
        assert len(boxes) == len(ref_boxes) == images
        for ours, theirs in zip(boxes + scores, ref_boxes + ref_scores, strict=True):
            assert torch.equal(ours, theirs)
        assert all(0 < len(b) <= rpn.post_nms_top_n() for b in boxes)


def test_map_on_threads_keeps_order_and_runs_here_when_it_should(two_threads):
    cpu = torch.device("cpu")
    assert map_on_threads(lambda i: i * i, range(50), cpu) == [i * i for i in range(50)]
    assert cpu_paths._POOL[0] == 2
    torch.set_num_threads(3)  # a new thread count: a new pool of that many
    assert map_on_threads(lambda i: i - 1, range(7), cpu) == list(range(-1, 6)) and cpu_paths._POOL[0] == 3
    torch.set_num_threads(2)
    here = []
    for device, autocast in ((torch.device("meta"), False), (cpu, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            cpu_paths._POOL = None
            here.append(map_on_threads(lambda i: i + 1, [1, 2, 3], device))
            assert cpu_paths._POOL is None  # another device or CPU autocast: in this thread
    assert here == [[2, 3, 4]] * 2
    torch.set_num_threads(1)
    cpu_paths._POOL = None
    assert map_on_threads(lambda i: -i, [1, 2], cpu) == [-1, -2] and cpu_paths._POOL is None


@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (3, 5, 17, 9), (2, 3, 1, 1)])
def test_channels_last_max_pool_is_torch_s(two_threads, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen)
    x.view(-1)[::5] = 0.0
    x.view(-1)[1::7] = -0.0  # signed zeros side by side: the kept one's sign must be torch's
    x.view(-1)[::11] = -torch.inf
    x.view(-1)[::97] = torch.nan
    pool = nn.MaxPool2d(3, 2, 1)
    ours = ChannelsLastMaxPool2d(3, 2, 1)
    expected = pool(x)
    with torch.inference_mode():
        got = ours(x)
    assert got.is_contiguous() and got.shape == expected.shape
    assert torch.equal(got.isnan(), expected.isnan())
    same = got.nan_to_num(nan=7.0).view(torch.int32) == expected.nan_to_num(nan=7.0).view(torch.int32)
    assert same.all()  # bit for bit, -0.0 against 0.0 included
    # a gradient through it, or an input already channels-last: torch's own module
    leaf = x.nan_to_num().requires_grad_()
    ours(leaf).sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, torch.autograd.grad(pool(leaf).sum(), leaf)[0])
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(channels_last).nan_to_num(), F.max_pool2d(channels_last, 3, 2, 1).nan_to_num())


def _images_and_targets(seed: int) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(3):
        image = torch.rand(3, 128, 128, generator=gen) * 0.2
        boxes, masks = [], []
        for _ in range(3):
            x0, y0 = (torch.randint(0, 80, (2,), generator=gen)).tolist()
            w, h = (torch.randint(12, 48, (2,), generator=gen)).tolist()
            image[:, y0 : y0 + h, x0 : x0 + w] += torch.rand(3, 1, 1, generator=gen)
            mask = torch.zeros(128, 128, dtype=torch.uint8)
            mask[y0 : y0 + h, x0 : x0 + w] = 1
            boxes.append([x0, y0, min(128, x0 + w), min(128, y0 + h)])
            masks.append(mask)
        images.append(image.clamp(0, 1))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.ones(3, dtype=torch.int64),
                "masks": torch.stack(masks),
            }
        )
    return images, targets


def test_the_proposer_trains_and_infers_as_torchvision_s(two_threads):
    """One training step (losses and every gradient) and inference (boxes, scores, masks) of the proposer with
    the threaded RPN and the channels-last stem pool equal those of the same weights in torchvision's classes."""
    torch.manual_seed(0)
    model = build_model("resnet18", 128, fpn_channels=32)
    assert isinstance(model.backbone.body.maxpool, ChannelsLastMaxPool2d)
    reference = _as_torchvision(model)
    images, targets = _images_and_targets(0)
    grads = []
    for net in (model, reference):
        net.train()
        torch.manual_seed(1)  # the RoI samplers' draws
        losses = net(images, targets)
        sum(losses.values()).backward()
        grads.append((losses, [p.grad for p in net.parameters() if p.requires_grad]))
    (ours, our_grads), (theirs, their_grads) = grads
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.equal(a, b) for a, b in zip(our_grads, their_grads, strict=True))
    outputs = []
    for net in (model, reference):
        net.eval()
        with torch.inference_mode():
            outputs.append(net(images))
    for ours, theirs in zip(*outputs, strict=True):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_feature_backbone_pools_as_torchvision_s(two_threads):
    backbone = build_backbone("resnet18", "random", seed=0)
    assert isinstance(backbone.resnet.maxpool, ChannelsLastMaxPool2d)
    reference = copy.deepcopy(backbone)
    reference.resnet.maxpool.__class__ = nn.MaxPool2d
    views = torch.rand(40, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(backbone(views), reference(views))
