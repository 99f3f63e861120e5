"""Benchmark of pipeline.models.cpu_paths (a script, not a test): the RPN's per-image filtering on threads and the
channels-last stem max-pool, against torchvision's own classes, in one process.

The trained proposer (models/proposer.pt, so `make repro` first) and the embedded world's proposer images
(data/prepared). Each row times the new path and torchvision's in turn, ``--repeat`` rounds, so that every round
sees the same load on a shared machine; the table gives the median of each, the ratio, and whether the outputs
(and, for the training step, every loss and gradient) are bit-identical:

- the RPN's filtering of a training batch (4 images, its decoded proposals and scores as the RPN hands them on);
- the same at inference (8 images, propose's batch);
- the stem max-pool of sample's feature backbone on 128 views of 64 px (its batch);
- a whole training step of the proposer (forward and backward, the RoI samplers seeded alike; no SGD step);
- a propose batch (8 images, inference).

    python benchmarks/bench_cpu_paths.py [--threads 2] [--repeat 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402

from pipeline.data.dataset import read_manifest  # noqa: E402
from pipeline.data.proposer_data import CocoInstances  # noqa: E402
from pipeline.models.features import build_backbone  # noqa: E402
from pipeline.models.proposer import load_checkpoint  # noqa: E402
from pipeline.models.proposer_train import _set_roi_align_grad  # noqa: E402


def same(a, b) -> bool:
    """Bit-identical nested tensors (dicts, lists, tuples)."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def rpn_inputs(model: nn.Module, images: list[torch.Tensor], targets: list[dict] | None) -> tuple:
    """What the RPN hands to filter_proposals for this batch (captured from one forward pass, in the model's
    mode)."""
    captured = {}
    real = type(model.rpn).filter_proposals

    def capture(self, *args):
        captured["args"] = args
        return real(self, *args)

    type(model.rpn).filter_proposals = capture
    try:
        with torch.no_grad():
            model(images, targets)
    finally:
        type(model.rpn).filter_proposals = real
    return captured["args"]


def cases(model: nn.Module, reference: nn.Module, data: CocoInstances) -> dict[str, tuple[Callable, Callable]]:
    """name: (the new path, torchvision's), each returning what is compared."""
    train_items = [data[i] for i in range(4)]
    train_images, targets = [im for im, _ in train_items], [t for _, t in train_items]
    infer_images = [data[i][0] for i in range(4, 12)]
    probe = copy.deepcopy(model)  # a training-mode forward updates batch norm's statistics: not the timed ones'
    train_args = rpn_inputs(probe.train(), train_images, targets)
    infer_args = rpn_inputs(probe.eval(), infer_images, None)
    for net in (model, reference):
        _set_roi_align_grad(net, True)
    backbone = build_backbone("resnet18", "proposer", seed=0, proposer_checkpoint=ROOT / "models/proposer.pt")
    stem = backbone.resnet
    views = torch.rand(128, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        stem_in = stem.relu(stem.bn1(stem.conv1((views - backbone.mean) / backbone.std)))
    plain_pool = copy.deepcopy(stem.maxpool)  # the same pool in torchvision's class
    plain_pool.__class__ = nn.MaxPool2d

    def filtering(net: nn.Module, args: tuple, training: bool) -> Callable:
        def run():
            net.rpn.train(training)
            with torch.no_grad():
                return net.rpn.filter_proposals(*args)

        return run

    def step(net: nn.Module) -> Callable:
        def run():
            net.train()
            net.zero_grad(set_to_none=True)
            torch.manual_seed(0)  # the RoI samplers
            losses = net(train_images, targets)
            sum(losses.values()).backward()
            return losses, [p.grad for p in net.parameters() if p.requires_grad]

        return run

    def infer(net: nn.Module) -> Callable:
        def run():
            net.eval()
            with torch.inference_mode():
                return net(infer_images)

        return run

    def pool(module: nn.Module) -> Callable:
        def run():
            with torch.inference_mode():
                return module(stem_in)

        return run

    return {
        "RPN filtering, training batch (4 images)": (
            filtering(model, train_args, True),
            filtering(reference, train_args, True),
        ),
        "RPN filtering, propose batch (8 images)": (
            filtering(model, infer_args, False),
            filtering(reference, infer_args, False),
        ),
        "stem max-pool, sample batch (128 views of 64 px)": (pool(stem.maxpool), pool(plain_pool)),
        "training step (forward + backward, 4 images)": (step(model), step(reference)),
        "propose batch (inference, 8 images)": (infer(model), infer(reference)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=15, help="interleaved rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = ROOT / "models/proposer.pt"
    manifest_path = ROOT / "data/prepared/dataset.json"
    if not checkpoint.is_file() or not manifest_path.is_file():
        sys.exit(f"needs {checkpoint} and {manifest_path}: run `make repro` first")
    manifest = read_manifest(manifest_path)
    data = CocoInstances(ROOT / manifest.proposer_json, ROOT / manifest.proposer_images(), skip_empty=True)
    model = load_checkpoint(checkpoint)
    reference = copy.deepcopy(model)
    reference.rpn.__class__ = RegionProposalNetwork
    reference.backbone.body.maxpool.__class__ = nn.MaxPool2d
    times: dict[str, tuple[list[float], list[float]]] = {}
    identical: dict[str, bool] = {}
    for name, (new, old) in cases(model, reference, data).items():
        identical[name] = same(new(), old())  # also the warm-up
        times[name] = ([], [])
        for round_ in range(args.repeat):
            for index, fn in ((0, new), (1, old)) if round_ % 2 else ((1, old), (0, new)):
                start = time.perf_counter()
                fn()
                times[name][index].append(time.perf_counter() - start)
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(
        f"\npipeline.models.cpu_paths against torchvision's classes: the trained proposer, {args.threads} thread(s), "
        f"median of {args.repeat} interleaved rounds\n"
    )
    print("| what | torchvision (ms) | cpu_paths (ms) | speed-up | identical |")
    print("|---|---:|---:|---:|---|")
    for name, (new, old) in times.items():
        a, b = statistics.median(old), statistics.median(new)
        print(f"| {name} | {a * 1000:.1f} | {b * 1000:.1f} | {a / b:.2f}x | {'yes' if identical[name] else 'NO'} |")


if __name__ == "__main__":
    main()
