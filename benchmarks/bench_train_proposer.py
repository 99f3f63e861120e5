"""Benchmark of train_proposer (a script, not a test): training steps/s and images/s of the variants tried for
the "first result in under 10 minutes" target, with ratios against the previous defaults measured in the same run.

Each (variant, repeat) runs in its own subprocess: the real `train_proposer` on the embedded world's proposer
images (data/prepared, so `make repro` or `python -m stages.prepare` first), `--warmup` steps untimed (the RoI
budgets fill up within the first steps), then `--steps` timed ones. Variants are interleaved round by round, so a
neighbour's load on a shared machine hits all of them alike; the table gives the median over `--repeat` rounds
and the spread (min-max), both wall time and the process's CPU time (which the neighbours disturb less).

    python benchmarks/bench_train_proposer.py [--steps 20] [--warmup 10] [--repeat 3] [--threads 2] [--only a,b]
                                              [--variants cpu|lvis|openmp] [--device cpu] [--backbone resnet18]
                                              [--image-size 128] [--neighbours 0]

The "defaults + ..." variants are the speed params of `proposer`: `num_workers` (DataLoader processes decoding
the images; the same weights) and `amp` (bf16 / fp16 autocast of the forward pass; other weights). `--variants
lvis` times the same params on torchvision's heads (FPN 256, 512 RoIs per image), which benchmarks/gpu_check.sh
runs on a GPU at 800 px with a resnet50.

`--variants openmp` times the defaults under each way OpenMP's idle threads can wait (`WAITS`: sleep at once, spin
libgomp's default 300,000 rounds, or a shorter spin; the stage itself spins 3,000), with `--neighbours N` busy
processes keeping N cores taken meanwhile. The other sets inherit this process's environment, so they run with
libgomp's default unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
    "defaults + 2 decoding workers": (
        {"fpn_channels": 128},
        {"roi_align_grad": "sparse", "rois_per_image": 32, "num_workers": 2},
        False,
    ),
    "defaults + bf16 autocast": (
        {"fpn_channels": 128},
        {"roi_align_grad": "sparse", "rois_per_image": 32, "amp": "bf16"},
        False,
    ),
    "defaults + fp16 autocast": (
        {"fpn_channels": 128},
        {"roi_align_grad": "sparse", "rois_per_image": 32, "amp": "fp16"},
        False,
    ),
}
# torchvision's heads at LVIS size (FPN 256, its 512 RoIs per image at >= 512 px): `--variants lvis`, for a GPU
LVIS_VARIANTS: dict[str, tuple[dict, dict, bool]] = {
    "LVIS heads (FPN 256, 512 RoIs)": ({}, {"rois_per_image": None}, False),
    "LVIS + 4 decoding workers": ({}, {"rois_per_image": None, "num_workers": 4}, False),
    "LVIS + bf16 autocast": ({}, {"rois_per_image": None, "amp": "bf16"}, False),
    "LVIS + fp16 autocast": ({}, {"rois_per_image": None, "amp": "fp16"}, False),
    "LVIS + 4 workers + bf16": ({}, {"rois_per_image": None, "num_workers": 4, "amp": "bf16"}, False),
}
# `--variants openmp` (module doc): the environment of each way of waiting
WAITS: dict[str, dict[str, str]] = {
    "OMP_WAIT_POLICY=PASSIVE (sleep at once; the stage's before 0137a67)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "libgomp's default (spin 300,000 rounds, then sleep)": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=3000 (the stage's)": {"GOMP_SPINCOUNT": "3000"},
}
OPENMP_VARIANTS = {name: VARIANTS["sparse + FPN 128 + 32 RoIs (defaults)"] for name in WAITS}
SETS = {"cpu": VARIANTS, "lvis": LVIS_VARIANTS, "openmp": OPENMP_VARIANTS}


class _Done(Exception):
    pass


def run_variant(
    name: str, steps: int, warmup: int, threads: int, batch_size: int, device: str, backbone: str, image_size: int
) -> dict:
    """Inside the subprocess: train `warmup + steps` steps of variant `name`; time the last `steps`."""
    import torch

    from pipeline.data.dataset import read_manifest
    from pipeline.models.proposer import build_model
    from pipeline.models.proposer_train import train_proposer

    torch.set_num_threads(threads)
    build_kw, train_kw, channels_last = {**VARIANTS, **LVIS_VARIANTS, **OPENMP_VARIANTS}[name]
    manifest = read_manifest(ROOT / "data/prepared/dataset.json")
    torch.manual_seed(0)
    model = build_model(backbone, image_size, **build_kw)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    clock: dict[str, float] = {}

    def log_step(step: int, _record: dict) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
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
            device=device,
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
    parser.add_argument(
        "--variants",
        choices=sorted(SETS),
        default="cpu",
        help="cpu: the 128 px ones; lvis: FPN 256; openmp: the defaults under each way of waiting (WAITS)",
    )
    parser.add_argument("--neighbours", type=int, default=0, help="busy processes (one core each) while measuring")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128, help="the proposer's input size (images are resized)")
    parser.add_argument("--only", help="comma-separated substrings of the variant names to run (the baseline always)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.variant is not None:
        shape = (args.device, args.backbone, args.image_size)
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup, args.threads, args.batch_size, *shape)))
        return
    variants = SETS[args.variants]
    baseline = next(iter(variants))
    names = [n for n in variants if n == baseline or not args.only or any(s in n for s in args.only.split(","))]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    neighbours: list[subprocess.Popen] = []
    try:
        for _ in range(args.neighbours):
            neighbours.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        measure(args, names, runs)
    finally:
        for busy in neighbours:
            busy.kill()
            busy.wait()
    report(args, names, runs, baseline)


def measure(args: argparse.Namespace, names: list[str], runs: dict[str, list[dict]]) -> None:
    """Run every variant `args.repeat` times, round by round, each in its own subprocess."""
    for round_ in range(args.repeat):
        for name in names:
            cmd = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--warmup"]
            cmd += [str(args.warmup), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
            cmd += ["--device", args.device, "--backbone", args.backbone, "--image-size", str(args.image_size)]
            env = None
            if name in WAITS:  # only this variant's way of waiting
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                env.update(WAITS[name])
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"variant {name!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(row)
            print(f"round {round_ + 1}: {name}: {row['wall'] * 1000:.0f} ms/step wall, {row['cpu'] * 1000:.0f} cpu",
                  file=sys.stderr, flush=True)  # fmt: skip


def report(args: argparse.Namespace, names: list[str], runs: dict[str, list[dict]], baseline: str) -> None:
    """Print the table: medians, spreads and speed-ups against `baseline`."""
    base = statistics.median(r["wall"] for r in runs[baseline])
    base_cpu = statistics.median(r["cpu"] for r in runs[baseline])
    print(
        f"\ntrain_proposer steps on the embedded world ({args.backbone} at {args.image_size} px, batch "
        f"{args.batch_size}), {args.threads} thread(s), {args.device}; median of {args.repeat} interleaved rounds "
        f"of {args.steps} steps after {args.warmup}; {args.neighbours} busy neighbour process(es); spread = min-max\n"
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
