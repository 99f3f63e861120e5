"""Benchmark of the propose stage (a script, not a test): images/s and proposals/s over the val split, reading
the images from disk as the stage does (`pipeline.stores.proposals.propose_split`), for each way of running it:

    baseline      batch 8, images decoded in this process one batch at a time, float32
    batch 1       one image per forward pass
    workers N     images decoded ahead in N DataLoader workers (prefetch 2 batches each; pinned only on CUDA)
    amp bf16/fp16 the network under autocast (fp16 on a CPU only where this torch build has it)
    workers + bf16

Each mode runs in its own subprocess (its peak RSS is its own), all modes once per round, `--repeat` rounds
interleaved, and the best round of each is reported with its ratio to the baseline's best: a slower
neighbour on a shared machine hits every mode alike. Uses models/proposer.pt when it exists (`make repro`
first), else a randomly initialised proposer (score threshold 0, so that every image still yields proposals).
An amp mode also reports how far its proposals are from float32's: the proposal count and, over the
proposals both keep, the largest score difference.

    python benchmarks/bench_propose.py [--images 120] [--repeat 3] [--threads 2] [--device cpu] [--workers 2]
                                       [--proposer models/proposer.pt] [--score-thresh 0.5]

``--proposer`` another checkpoint (benchmarks/gpu_check.sh passes a random R50-FPN at 800 px, LVIS' size, with
``--score-thresh 0`` so that every image yields its 20 proposals).
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


def modes(workers: int) -> dict[str, dict]:
    base = {"batch": 8, "num_workers": 0, "amp": "off"}
    return {
        "baseline": base,
        "batch 1": {**base, "batch": 1},
        "workers 1": {**base, "num_workers": 1},
        f"workers {workers}": {**base, "num_workers": workers},
        "amp bf16": {**base, "amp": "bf16"},
        "amp fp16": {**base, "amp": "fp16"},
        f"workers {workers} + bf16": {**base, "num_workers": workers, "amp": "bf16"},
    }


def run_mode(mode: dict, threads: int, n_images: int, device: str, proposer: Path, score_thresh: float | None) -> dict:
    """Inside the subprocess: propose_split over the first `n_images` val images; timing, peak RSS, outputs."""
    import numpy as np
    import torch

    from pipeline.data.annotation_stream import load_image_records
    from pipeline.data.dataset import read_manifest
    from pipeline.errors import PipelineError
    from pipeline.models.proposer import MASK_SIZE, build_model, load_checkpoint, propose
    from pipeline.stores.proposals import propose_split

    torch.set_num_threads(threads)
    manifest = read_manifest(ROOT / "data/prepared/dataset.json")
    records = sorted(load_image_records(ROOT / manifest.split_json("val"), "LVIS annotations"), key=lambda r: r["id"])
    records = records[:n_images]
    root = ROOT / manifest.image_root
    if proposer.is_file():
        infer_kw = {} if score_thresh is None else {"score_thresh": score_thresh}
        model = load_checkpoint(proposer, **infer_kw)
        size, n_params = model.transform.max_size, sum(t.numel() for t in model.parameters()) / 1e6
        weights = f"{proposer.name} ({size} px, {n_params:.1f} M parameters)"
    else:
        torch.manual_seed(0)
        model, weights = build_model("resnet18", 128, score_thresh=0.0), "random resnet18 (128 px)"

    def infer(batch):
        return propose(model, batch, device=device, amp=mode["amp"])

    kw = {"batch_size": mode["batch"], "mask_size": MASK_SIZE, "progress": False}
    try:
        propose_split(records[: mode["batch"]], root, infer, **kw)  # warm-up (and amp support)
    except PipelineError as err:
        return {"error": str(err)}
    start = time.perf_counter()
    result = propose_split(
        records, root, infer, num_workers=mode["num_workers"], pin_memory=device.startswith("cuda"), **kw
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "images": len(records),
        "proposals": len(result.scores),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weights": weights,
        "offsets": result.image_offsets.tolist(),
        "scores": np.round(result.scores.astype(float), 6).tolist(),
    }


def score_gap(base: dict, row: dict) -> str:
    """Largest |score difference| over the first k proposals of each image, k the smaller of the two counts."""
    worst = 0.0
    for i in range(len(base["offsets"]) - 1):
        a = base["scores"][base["offsets"][i] : base["offsets"][i + 1]]
        b = row["scores"][row["offsets"][i] : row["offsets"][i + 1]]
        worst = max([worst] + [abs(x - y) for x, y in zip(a, b, strict=False)])
    return f"{worst:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--proposer", type=Path, default=ROOT / "models/proposer.pt", help="checkpoint")
    parser.add_argument("--score-thresh", type=float, help="the checkpoint's score threshold (default: 0.5)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode (JSON), print JSON
    args = parser.parse_args()
    if args.mode is not None:
        mode = json.loads(args.mode)
        print(json.dumps(run_mode(mode, args.threads, args.images, args.device, args.proposer, args.score_thresh)))
        return
    table = modes(args.workers)
    best: dict[str, dict] = {}
    for _ in range(max(1, args.repeat)):
        for name, mode in table.items():
            cmd = [sys.executable, __file__, "--mode", json.dumps(mode), "--threads", str(args.threads)]
            cmd += ["--images", str(args.images), "--device", args.device, "--proposer", str(args.proposer)]
            cmd += [] if args.score_thresh is None else ["--score-thresh", str(args.score_thresh)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"mode {name!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if "error" in row or name not in best or row["seconds"] < best[name]["seconds"]:
                best[name] = row
    base = best["baseline"]
    rate = base["images"] / base["seconds"]
    print(
        f"propose on {base['images']} val images read from disk, {base['weights']} proposer, {args.device}, "
        f"{args.threads} threads, best of {args.repeat} interleaved rounds\n"
    )
    print("| mode | images/s | proposals/s | vs baseline | proposals | max score diff vs fp32 | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in best.items():
        if "error" in row:
            print(f"| {name} | n/a | n/a | n/a | n/a | n/a | {row['error']} |")
            continue
        images_s, props_s = row["images"] / row["seconds"], row["proposals"] / row["seconds"]
        gap = score_gap(base, row) if table[name]["amp"] != "off" else "0 (fp32)"
        print(
            f"| {name} | {images_s:.1f} | {props_s:.0f} | {images_s / rate:.2f}x | {row['proposals']} | {gap} | "
            f"{row['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
