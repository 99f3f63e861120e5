"""Embedding-training throughput (mask + object + hier triplets per second) on synthetic features.

    python benchmarks/bench_embed.py                     # N=20000, D=512, batches 128/512/2048, cpu (+cuda)
    python benchmarks/bench_embed.py --devices cpu --epochs 2 --threads 2

Synthetic input shaped like the `sample` stage's output: 20 proposals per image, one object pair and one
hier pair per proposal on average (within images). Each configuration trains `--epochs` epochs after one
warm-up epoch (not timed, also absorbs lazy imports and CUDA initialisation); the rate counts every
triplet (mask, object, hier) trained on. Ratios are against the smallest batch size measured on the same
device in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models.embedding_train import train_embedder  # noqa: E402


def synthetic(n: int, d: int, per_image: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    box = rng.normal(size=(n, d)).astype(np.float32)
    features = {
        "box": box,
        "fg": (box + 0.3 * rng.normal(size=(n, d))).astype(np.float32),
        "bg": rng.normal(size=(n, d)).astype(np.float32),
    }
    offsets = np.append(np.arange(0, n, per_image), n).astype(np.int64)
    image = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))

    def pairs_within_images(count: int) -> np.ndarray:
        first = rng.integers(0, n, count)
        start, size = offsets[image[first]], np.diff(offsets)[image[first]]
        second = start + (first - start + 1 + rng.integers(0, np.maximum(size - 1, 1))) % size
        keep = first != second
        return np.stack([first[keep], second[keep]], 1).astype(np.int64)

    return features, offsets, pairs_within_images(n), pairs_within_images(n)


def measure(data, batch_size: int, device: str, epochs: int) -> tuple[float, float]:
    features, offsets, object_pairs, hier_pairs = data
    kwargs = dict(
        hidden=256,
        dim=256,
        geometry="poincare",
        c=1.0,
        margin=0.2,
        weights={"mask": 1.0, "object": 1.0, "hier": 1.0},
        batch_size=batch_size,
        seed=0,
        device=device,
        progress=False,
    )
    train_embedder(features, offsets, object_pairs, hier_pairs, epochs=1, **kwargs)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, history = train_embedder(features, offsets, object_pairs, hier_pairs, epochs=epochs, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    triplets = sum(h["triplets"] for h in history)
    return triplets / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    data = synthetic(args.n, args.dim)
    print(
        f"N={args.n} D={args.dim} MLP {args.dim}->256->256->256 poincare, object pairs={len(data[2])}, "
        f"hier pairs={len(data[3])}, epochs={args.epochs}, torch {torch.__version__}, "
        f"cpu threads={torch.get_num_threads()}"
        + (f", gpu={torch.cuda.get_device_name()}" if "cuda" in devices else "")
    )
    print(f"{'device':<7} {'batch':>6} {'triplets/s':>12} {'s/epoch':>9} {'ratio':>6}")
    for device in devices:
        base = None
        for batch_size in sorted(args.batch_sizes):
            rate, seconds = measure(data, batch_size, device, args.epochs)
            base = base or rate
            print(f"{device:<7} {batch_size:>6} {rate:>12,.0f} {seconds / args.epochs:>9.2f} {rate / base:>6.2f}")


if __name__ == "__main__":
    main()
