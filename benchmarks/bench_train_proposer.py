"""Benchmark of train_proposer (a script, not a test): training steps/s and images/s of the variants tried for
the "first result in under 10 minutes" target, with ratios against the previous defaults measured in the same run.

Each (variant, repeat) runs in its own subprocess: the real `train_proposer` on the embedded world's proposer
images (data/prepared, so `make repro` or `python -m stages.prepare` first), `--warmup` steps untimed (the RoI
budgets fill up within the first steps), then `--steps` timed ones. Variants are interleaved round by round, so a
neighbour's load on a shared machine hits all of them alike; the table gives the median over `--repeat` rounds
and the spread (min-max), both wall time and the process's CPU time (which the neighbours disturb less).

    python benchmarks/bench_train_proposer.py [--steps 20] [--warmup 10] [--repeat 3] [--threads 2] [--only a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

# name: (build_model keywords, train_proposer keywords, channels_last)
VARIANTS: dict[str, tuple[dict, dict, bool]] = {
    "baseline (torchvision grad, FPN 256, 64 RoIs)": (
        {},
        {"roi_align_grad": "torchvision", "rois_per_image": 64},
        False,
    ),
    "sparse RoIAlign grad": ({}, {"roi_align_grad": "sparse", "rois_per_image": 64}, False),
    "sparse + channels_last": ({}, {"roi_align_grad": "sparse", "rois_per_image": 64}, True),
    "sparse + 32 RoIs": ({}, {"roi_align_grad": "sparse", "rois_per_image": 32}, False),
    "sparse + FPN 128": ({"fpn_channels": 128}, {"roi_align_grad": "sparse", "rois_per_image": 64}, False),
    "sparse + FPN 128 + 32 RoIs (defaults)": (
        {"fpn_channels": 128},
        {"roi_align_grad": "sparse", "rois_per_image": 32},
        False,
    ),
}
BASELINE = next(iter(VARIANTS))


class _Done(Exception):
    pass


def run_variant(name: str, steps: int, warmup: int, threads: int, batch_size: int) -> dict:
    """Inside the subprocess: train `warmup + steps` steps of variant `name`; time the last `steps`."""
    import torch

    from pipeline.data.dataset import read_manifest
    from pipeline.models.proposer import build_model
    from pipeline.models.proposer_train import train_proposer

    torch.set_num_threads(threads)
    build_kw, train_kw, channels_last = VARIANTS[name]
    manifest = read_manifest(ROOT / "data/prepared/dataset.json")
    torch.manual_seed(0)
    model = build_model("resnet18", 128, **build_kw)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    clock: dict[str, float] = {}

    def log_step(step: int, _record: dict) -> None:
        if step == warmup - 1:
            clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()
        elif step == warmup + steps - 1:
            clock["wall"] = time.perf_counter() - clock["wall"]
            clock["cpu"] = time.process_time() - clock["cpu"]
            raise _Done

    with contextlib.suppress(_Done):  # raised once the timed steps are done
        train_proposer(
            model,
            ROOT / manifest.proposer_json,
            ROOT / manifest.proposer_images(),
            epochs=8,
            batch_size=batch_size,
            lr=0.02,
            seed=0,
            device="cpu",
            log_step=log_step,
            progress=False,
            **train_kw,
        )
    return {"name": name, "wall": clock["wall"] / steps, "cpu": clock["cpu"] / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the variants")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the default of 2 cores)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--only", help="comma-separated substrings of the variant names to run (the baseline always)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup, args.threads, args.batch_size)))
        return
    names = [n for n in VARIANTS if n == BASELINE or not args.only or any(s in n for s in args.only.split(","))]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.repeat):
        for name in names:
            cmd = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--warmup"]
            cmd += [str(args.warmup), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(row)
            print(f"round {round_ + 1}: {name}: {row['wall'] * 1000:.0f} ms/step wall, {row['cpu'] * 1000:.0f} cpu",
                  file=sys.stderr, flush=True)  # fmt: skip
    base = statistics.median(r["wall"] for r in runs[BASELINE])
    base_cpu = statistics.median(r["cpu"] for r in runs[BASELINE])
    print(
        f"\ntrain_proposer steps on the embedded world (128 px, batch {args.batch_size}), {args.threads} thread(s), "
        f"CPU; median of {args.repeat} interleaved rounds of {args.steps} steps after {args.warmup}; spread = min-max\n"
    )
    print("| variant | steps/s | images/s | ms/step wall (spread) | speed-up | CPU ms/step (spread) | CPU speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        walls, cpus = [r["wall"] for r in runs[name]], [r["cpu"] for r in runs[name]]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(
            f"| {name} | {1 / wall:.2f} | {args.batch_size / wall:.1f} | {wall * 1000:.0f} ({min(walls) * 1000:.0f}-"
            f"{max(walls) * 1000:.0f}) | {base / wall:.2f}x | {cpu * 1000:.0f} ({min(cpus) * 1000:.0f}-"
            f"{max(cpus) * 1000:.0f}) | {base_cpu / cpu:.2f}x |"
        )


if __name__ == "__main__":
    main()
