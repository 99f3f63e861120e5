"""Benchmark of the propose stage (a script, not a test): images/s on the default val split, one image at a
time against batched inference, and the peak memory of each mode.

Each mode runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own. Uses the
trained proposer at models/proposer.pt when it exists (run `make repro` first), else a randomly initialised
one (score threshold 0 then, so that every image still yields its 20 proposals), and the val images of
data/prepared.

    python benchmarks/bench_propose.py [--batch 8] [--threads 2] [--images 120]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere


def run_mode(batch: int, threads: int, n_images: int) -> dict:
    """Inside the subprocess: propose over the val images `batch` at a time; return timing and peak memory."""
    import torch

    from pipeline.data.dataset import read_manifest
    from pipeline.data.lvis_format import image_path, load_image, load_json
    from pipeline.proposer import build_model, load_checkpoint, propose

    torch.set_num_threads(threads)
    manifest = read_manifest(ROOT / "data/prepared/dataset.json")
    records = sorted(load_json(ROOT / manifest.val_json, "LVIS annotations")["images"], key=lambda r: r["id"])
    images = [load_image(image_path(r, ROOT / manifest.image_root)) for r in records[:n_images]]
    checkpoint = ROOT / "models/proposer.pt"
    if checkpoint.is_file():
        model, weights = load_checkpoint(checkpoint), "trained"
    else:
        torch.manual_seed(0)
        model, weights = build_model("resnet18", int(images[0].shape[0]), score_thresh=0.0), "random"
    propose(model, images[:batch], device="cpu", batch_size=batch)  # warm-up
    start = time.perf_counter()
    results = propose(model, images, device="cpu", batch_size=batch)
    seconds = time.perf_counter() - start
    return {
        "batch": batch,
        "images": len(images),
        "proposals": sum(len(r["scores"]) for r in results),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weights": weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--mode", type=int, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(run_mode(args.mode, args.threads, args.images)))
        return
    rows = []
    for batch in (1, args.batch):
        cmd = [sys.executable, __file__, "--mode", str(batch), "--threads", str(args.threads)]
        done = subprocess.run([*cmd, "--images", str(args.images)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["images"] / rows[0]["seconds"]
    print(f"propose on {rows[0]['images']} val images, {rows[0]['weights']} proposer, {args.threads} threads, CPU\n")
    print("| batch | images/s | proposals | seconds | peak RSS MB | vs batch 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        rate = row["images"] / row["seconds"]
        print(
            f"| {row['batch']} | {rate:.1f} | {row['proposals']} | {row['seconds']:.2f} | "
            f"{row['peak_rss_mb']:.0f} | {rate / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
