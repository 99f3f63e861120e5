"""Throughput of the sharded inference stages at 1 and N ranks (a script, not a test).

Runs `python -m stages.propose --split S` and then `python -m stages.sample --split S` as a user's `dvc repro`
would, with `dist.nproc` = each value of --nproc, in a scratch workspace holding a copy of this checkout's
data/prepared and models/ (run `make repro` first). Prints wall time (process start, model load and rank 0's
assembly included), images/s and proposals/s, the speed-up against the first --nproc value measured in the same
run, and whether every store is byte-identical to that first run's.

    python benchmarks/bench_ranks.py --split train --nproc 1,2            # the 2-core CPU check
    python benchmarks/bench_ranks.py --split train --nproc 1,8 --device cuda   # one machine with 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
import zarr

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_stage(work: Path, stage: str, split: str, nproc: int, device: str) -> float:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dist"]["nproc"], params["device"] = nproc, device
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--split", split],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{stage} at {nproc} rank(s) failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="train")
    parser.add_argument("--nproc", default="1,2", help="comma-separated rank counts; the first is the baseline")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    if not (ROOT / "models/proposer.pt").is_file():
        raise SystemExit("models/proposer.pt is missing: run `make repro` first")
    rows, reference = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_ranks_") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "data/prepared", work / "data/prepared")
        shutil.copytree(ROOT / "models", work / "models")
        for nproc in counts:
            for stage, store in (("propose", "proposals"), ("sample", "samples")):
                seconds = run_stage(work, stage, args.split, nproc, args.device)
                path = work / "data" / args.split / f"{store}.zarr"
                group = zarr.open_group(str(path), mode="r")
                images = int(group["image_offsets"].shape[0]) - 1
                proposals = int(group["image_offsets"][-1])
                same = reference.setdefault(stage, tree_bytes(path)) == tree_bytes(path)
                rows.append((stage, nproc, seconds, images / seconds, proposals / seconds, same))
    base = {stage: seconds for stage, nproc, seconds, *_ in rows if nproc == counts[0]}
    print(f"split {args.split}, device {args.device}, {len(counts)} rank counts (wall time of the whole stage)\n")
    print("| stage | ranks | seconds | images/s | proposals/s | speed-up | store identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for stage, nproc, seconds, img_rate, prop_rate, same in rows:
        print(
            f"| {stage} | {nproc} | {seconds:.1f} | {img_rate:.1f} | {prop_rate:.0f} | "
            f"{base[stage] / seconds:.2f}x | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
