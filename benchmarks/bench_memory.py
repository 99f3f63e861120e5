"""Peak resident memory of every stage at two dataset sizes, one 4x the other (a script, not a test).

Every stage streams its stores by chunks of images (DESIGN.md, "Scale"), so its peak memory should not
grow with the dataset. This runs each stage's real CLI (`python -m stages.X`) in its own subprocess, in a
temporary workspace, once on an input of size 1x and once on 4x, and reports the peak RSS of that process
(VmHWM of the stage process itself, read from /proc/self/status by a tiny runpy wrapper when the stage
exits; child processes, e.g. DataLoader workers, are polled and their largest VmHWM reported separately
when there are any), the ratio 4x / 1x, and a projection to LVIS v1 (a + b * size through the two points).

Not ru_maxrss: Linux carries it across exec from the forking process (subprocess uses vfork, so a stage
started by a benchmark holding 2 GB would report at least 2 GB), and torch's import runs `ldconfig -p`
that way too, so RUSAGE_CHILDREN reports the stage's own size for that short-lived child.

Inputs are fabricated so that two cores can run them in minutes while the data stay large:
- an LVIS v1-shaped dataset (real LVIS layout: coco_url into train2017/ and val2017/, COCO file_names),
  written as JSON text with LVIS v1's object count per image (12.7 polygon annotations of 50 points per
  train image, ~9 KB of JSON; COCO: 7.3 annotations of 25 points, ~3.3 KB), 1203 categories, and tiny
  images (hard links to a few files); `prepare` runs on it (source lvis), the other stages get a manifest
  (data/prepared/dataset.json) written here;
- an untrained proposer checkpoint (`propose.score_thresh` 0, so every image yields `max_proposals`);
  `train_proposer` trains 2 steps on 8 images, the rest of its COCO file excluded through the manifest;
- `propose` and `sample` run a network on every proposal, so only some images have files (propose skips
  the others, `on_missing_image: skip`) or proposals (sample): the annotation file keeps its full size;
- the stores downstream of `propose` written directly (pipeline.stores.store.StoreWriter, the attrs and
  fingerprint chain the stages check): random features of resnet50's width (D = 2048, float16) for embed,
  embeddings inside the unit ball for cluster, masks of a larger side than the mask head's 28 where a
  stage reads masks (more bytes per proposal: a stage that held them whole would show it).

The projection extrapolates the per-image slope, so it holds as far as the fabricated files have LVIS's
per-image volume (object count and polygon points; the real files' exact sizes were not available here).

    python benchmarks/bench_memory.py            # the full run (about 6 min on 2 idle CPU cores)
    python benchmarks/bench_memory.py --quick    # a smoke run on small sizes (ratios not meaningful)
    python benchmarks/bench_memory.py --stages embed,cluster --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere


from benchmarks.memory_inputs import (  # noqa: E402
    COCO_TRAIN_IMAGES,
    GB,
    LVIS_TRAIN_IMAGES,
    LVIS_VAL_IMAGES,
    MB,
    PROPOSALS_PER_IMAGE,
    REAL_MASK_SIDE,
    RESNET50_DIM,
    make_dataset,
    write_clusters,
    write_dataset_manifest,
    write_embeddings,
    write_params,
    write_proposals,
    write_proposer,
    write_samples,
)

TARGET_RATIO = 1.3
TARGET_PEAK_GB = 16.0

# The wrapper every stage runs under: the stage module as __main__ (runpy), then its own peak RSS.
WRAPPER = """
import json, runpy, sys


def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


module, report = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
finally:
    with open(report, "w") as f:
        json.dump({"self_kb": peak_kb()}, f)
sys.exit(code)
"""


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (through /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                out.append(child)
                todo.append(child)
    return out


def _hwm_kb(pid: int) -> int:
    """VmHWM (peak RSS) of a live process in KB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_stage(ws: Path, module: str, args: list[str], log: Path, timeout: float) -> dict:
    """`python -m <module> <args>` with cwd=ws under the peak-RSS wrapper.

    Returns {seconds, self_kb (VmHWM of the stage process at exit), children_kb (the largest VmHWM of its
    child processes, polled every 0.2 s: DataLoader workers and the like; a forked child's figure counts the
    pages it shares with the stage)}.
    """
    report = ws / ".peak_rss.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    children: dict[int, int] = {}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, module, str(report), *args],
            cwd=ws,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        while proc.poll() is None:
            for child in _descendants(proc.pid):
                children[child] = max(children.get(child, 0), _hwm_kb(child))
            if time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{module} {' '.join(args)}: no result after {timeout:.0f}s (see {log})")
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}) in {ws}:\n" + "\n".join(tail))
    usage = json.loads(report.read_text())
    return {"seconds": seconds, "self_kb": usage["self_kb"], "children_kb": max(children.values(), default=0)}


def import_peak_kb(module: str) -> int:
    """Peak RSS of a process that only imports `module` (the interpreter, torch and the stage's libraries)."""
    code = f"import importlib; importlib.import_module({module!r}); "
    code += "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


# -------------------------------------------------------------------------------------------------- the stages

VAL_PER_TRAIN = LVIS_VAL_IMAGES / LVIS_TRAIN_IMAGES  # 0.198
COCO_PER_TRAIN = COCO_TRAIN_IMAGES / LVIS_TRAIN_IMAGES  # 1.18
PROPOSE_PRESENT_EVERY = 100  # propose: one listed image in 100 has a file (the rest are skipped, no inference)
SAMPLE_PROPOSALS_EVERY = 50  # sample: one image in 50 has proposals (the backbone runs on those only)
SAMPLE_MASK_SIDE = 384  # sample's input masks: 147 KB per proposal (the mask head's 28 x 28: 784 B)
EVALUATE_MASK_SIDE = 160  # evaluate's input masks: 25 KB per proposal (a block of 4096: 100 MB)
EVALUATE_IMAGE_SIZE = 128
EMBED_DIM = 256  # embed.dim (params.yaml)


@dataclass
class Case:
    """One stage measured at two sizes: `setup(ws, size)` fabricates its inputs and params in `ws` and returns
    {"proposals": int, "bytes": int} (the stage's main data at that size, uncompressed)."""

    name: str
    module: str
    args: list[str]
    unit: str  # what `size` counts
    size: int  # the 1x size (4x is 4 * size)
    quick: int  # the 1x size of --quick
    lvis: int  # the LVIS v1 value of `unit`, for the projection
    setup: Callable[[Path, int], dict]
    data: str  # what "bytes" counts
    note: str = ""
    results: dict = field(default_factory=dict)


def setup_prepare(ws: Path, n: int) -> dict:
    data = make_dataset(ws, n, round(n * VAL_PER_TRAIN), round(n * COCO_PER_TRAIN), 32)
    lvis = {"train_json": str(data.train_json), "val_json": str(data.val_json), "image_root": str(data.image_root)}
    lvis |= {"coco_json": str(data.coco_json), "coco_image_root": None}
    write_params(ws, {"data": {"source": "lvis", "lvis": lvis}})
    return {"proposals": 0, "bytes": data.nbytes("train", "val", "coco")}


def setup_train_proposer(ws: Path, n: int) -> dict:
    data = make_dataset(ws, 0, 0, n, 64, link_limit=8)
    write_dataset_manifest(ws, data, excluded=[int(i) for i in data.coco_ids[8:]])  # 8 images: 2 steps
    write_params(ws, {"proposer": {"backbone": "resnet18", "image_size": 64, "epochs": 1, "batch_size": 4}})
    return {"proposals": 0, "bytes": data.nbytes("coco")}


def setup_propose(ws: Path, n: int) -> dict:
    data = make_dataset(ws, n, 0, 0, 64, link_step=PROPOSE_PRESENT_EVERY)
    write_dataset_manifest(ws, data)
    write_proposer(ws / "models/proposer.pt", 64)
    propose = {"score_thresh": 0.0, "max_proposals": PROPOSALS_PER_IMAGE, "on_missing_image": "skip"}
    write_params(ws, {"propose": propose})
    n_present = len(range(0, n, PROPOSE_PRESENT_EVERY))
    masks = n_present * PROPOSALS_PER_IMAGE * (REAL_MASK_SIDE**2 + 20)
    return {"proposals": n_present * PROPOSALS_PER_IMAGE, "bytes": data.nbytes("train") + masks}


def setup_sample(ws: Path, n: int) -> dict:
    data = make_dataset(ws, n, 0, 0, 64, link_step=SAMPLE_PROPOSALS_EVERY)
    write_dataset_manifest(ws, data)
    counts = np.where(np.arange(n) % SAMPLE_PROPOSALS_EVERY == 0, PROPOSALS_PER_IMAGE, 0)
    _, nbytes = write_proposals(ws / "data/train/proposals.zarr", data.train_ids, 64, counts, SAMPLE_MASK_SIDE, "train")
    sample = {"crop_size": 32, "backbone": "resnet18", "backbone_init": "random", "dtype": "float16"}
    write_params(ws, {"sample": sample})
    features = int(counts.sum()) * 3 * 512 * 2
    return {"proposals": int(counts.sum()), "bytes": data.nbytes("train") + sum(nbytes.values()) + features}


def setup_embed(ws: Path, n: int) -> dict:
    total = 0
    for split, images in (("train", n), ("val", max(1, round(n * VAL_PER_TRAIN)))):
        ids = np.arange(1, images + 1)
        counts = np.full(images, PROPOSALS_PER_IMAGE)
        source, _ = write_proposals(ws / f"data/{split}/proposals.zarr", ids, 64, counts, REAL_MASK_SIDE, split)
        path = ws / f"data/{split}/samples.zarr"
        _, nbytes = write_samples(path, images, PROPOSALS_PER_IMAGE, RESNET50_DIM, split, source)
        total += sum(nbytes.values())
    embed = {"epochs": 1, "batch_size": 256, "dim": EMBED_DIM, "num_workers": 0}
    write_params(ws, {"embed": embed})
    return {"proposals": n * PROPOSALS_PER_IMAGE, "bytes": total}


def setup_cluster(ws: Path, n: int) -> dict:
    _, nbytes = write_embeddings(ws / "data/val/embeddings.zarr", n, PROPOSALS_PER_IMAGE, EMBED_DIM, "fabricated")
    write_params(ws, {"cluster": {"k": "auto", "k_range": [4, 12, 4], "max_iter": 3}})
    return {"proposals": n * PROPOSALS_PER_IMAGE, "bytes": nbytes["embeddings"]}


def setup_evaluate(ws: Path, n: int) -> dict:
    data = make_dataset(ws, 0, n, 0, EVALUATE_IMAGE_SIZE)
    write_dataset_manifest(ws, data)
    counts = np.full(n, PROPOSALS_PER_IMAGE)
    folder = ws / "data/val"
    proposals, nbytes = write_proposals(
        folder / "proposals.zarr", data.val_ids, EVALUATE_IMAGE_SIZE, counts, EVALUATE_MASK_SIDE, "val"
    )
    samples, _ = write_samples(folder / "samples.zarr", n, PROPOSALS_PER_IMAGE, 8, "val", proposals)
    embeddings, more = write_embeddings(folder / "embeddings.zarr", n, PROPOSALS_PER_IMAGE, EMBED_DIM, samples)
    write_clusters(folder / "clusters.zarr", n * PROPOSALS_PER_IMAGE, 100, EMBED_DIM, embeddings)
    write_params(ws, {})
    return {
        "proposals": n * PROPOSALS_PER_IMAGE,
        "bytes": data.nbytes("val") + sum(nbytes.values()) + more["embeddings"],
    }


CASES = [
    Case(
        "prepare",
        "stages.prepare",
        [],
        "train images",
        10_000,
        1000,
        LVIS_TRAIN_IMAGES,
        setup_prepare,
        "LVIS train + val + COCO JSON (val 0.198x, COCO 1.18x the train images)",
        "source lvis: checks the three files in place",
    ),
    Case(
        "train_proposer",
        "stages.train_proposer",
        [],
        "COCO images",
        30_000,
        3000,
        COCO_TRAIN_IMAGES,
        setup_train_proposer,
        "COCO JSON",
        "all but 8 images excluded through the manifest: 2 steps of 4 images at 64 px; "
        "the file is streamed into an on-disk index",
    ),
    Case(
        "propose@train",
        "stages.propose",
        ["--split", "train"],
        "train images",
        5000,
        500,
        LVIS_TRAIN_IMAGES,
        setup_propose,
        "train JSON + masks written",
        f"untrained proposer at 64 px, score_thresh 0; 1 listed image in {PROPOSE_PRESENT_EVERY} has a file, "
        "the rest are skipped (on_missing_image: skip) so that inference stays cheap",
    ),
    Case(
        "sample@train",
        "stages.sample",
        ["--split", "train"],
        "train images",
        5000,
        500,
        LVIS_TRAIN_IMAGES,
        setup_sample,
        f"train JSON + masks read ({SAMPLE_MASK_SIDE}²) + features written",
        f"resnet18 (random init) on 32 px crops; 1 image in {SAMPLE_PROPOSALS_EVERY} has 20 proposals "
        "(features are written part by part: the feature width does not enter the slope)",
    ),
    Case(
        "embed",
        "stages.embed",
        [],
        "train images",
        1250,
        150,
        LVIS_TRAIN_IMAGES,
        setup_embed,
        "train + val features (D=2048 float16, 3 views) + pairs",
        "val = 0.198 x train images; 1 epoch",
    ),
    Case(
        "cluster",
        "stages.cluster",
        [],
        "val images",
        25_000,
        2500,
        LVIS_VAL_IMAGES,
        setup_cluster,
        f"val embeddings (d={EMBED_DIM} float32)",
        "k in 4, 8, 12 (elbow), 3 Lloyd iterations each",
    ),
    Case(
        "evaluate",
        "stages.evaluate",
        [],
        "val images",
        500,
        50,
        LVIS_VAL_IMAGES,
        setup_evaluate,
        f"val JSON + masks read ({EVALUATE_MASK_SIDE}²) + embeddings",
        f"{EVALUATE_IMAGE_SIZE} px images, 1203 categories, 100 clusters",
    ),
]


# ---------------------------------------------------------------------------------------------------- report


def _gb(kb: float) -> str:
    return f"{kb / (1 << 20):.2f} GB"


def _bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.0f} MB"


def project(case: Case) -> tuple[float, float, float]:
    """(a, b, peak at the LVIS size) in KB from the two measured points; b (KB per unit) floored at 0."""
    s1, s4 = case.results[1]["size"], case.results[4]["size"]
    p1, p4 = case.results[1]["self_kb"], case.results[4]["self_kb"]
    b = max(0.0, (p4 - p1) / (s4 - s1))
    a = p1 - b * s1
    return a, b, a + b * case.lvis


def verdict(case: Case) -> str:
    ratio = case.results[4]["self_kb"] / case.results[1]["self_kb"]
    _, _, peak = project(case)
    misses = []
    if ratio > TARGET_RATIO:
        misses.append(f"ratio > {TARGET_RATIO}")
    if peak / (1 << 20) >= TARGET_PEAK_GB:
        misses.append(f"LVIS >= {TARGET_PEAK_GB:.0f} GB")
    return "yes" if not misses else "**NO** (" + ", ".join(misses) + ")"


def print_table(cases: list[Case]) -> None:
    print(
        "\n| stage | size 1x (images / proposals / main data) | peak RSS 1x | peak RSS 4x | 4x / 1x "
        "| import only | LVIS v1 size | projected peak at LVIS v1 | meets target |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for case in cases:
        if 4 not in case.results:
            continue
        one, four = case.results[1], case.results[4]
        _, b, peak = project(case)
        size = f"{one['size']:,} {case.unit} / {one['proposals']:,} / {_bytes(one['bytes'])}"
        print(
            f"| {case.name} | {size} | {_gb(one['self_kb'])} | {_gb(four['self_kb'])} "
            f"| {four['self_kb'] / one['self_kb']:.2f} | {_gb(case.import_kb)} | {case.lvis:,} | {_gb(peak)} "
            f"| {verdict(case)} |"
        )
    print("\nWhat each row ran (main data: what 'bytes' counts; 4x is four times every count):\n")
    for case in cases:
        if 4 not in case.results:
            continue
        one, four = case.results[1], case.results[4]
        a, b, _ = project(case)
        children = max(one["children_kb"], four["children_kb"])
        extra = f"; its child processes peaked at {_gb(children)}" if children > 100 * 1024 else ""
        print(
            f"- {case.name}: {case.data}; {case.note}. Fit: {_gb(a)} + {b:.0f} KB per {case.unit[:-1]}; "
            f"{one['seconds']:.0f} s + {four['seconds']:.0f} s{extra}."
        )


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (ratios not meaningful)")
    parser.add_argument("--stages", default="", help="comma-separated subset of: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every 1x size by this")
    parser.add_argument("--workdir", type=Path, default=None, help="where the workspaces go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces (fabricated data, logs)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one stage run")
    args = parser.parse_args()
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    cases = [c for c in CASES if not wanted or c.name in wanted]
    workdir = Path(tempfile.mkdtemp(prefix="bench_memory-", dir=args.workdir))
    started = time.perf_counter()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"bench_memory: workspaces under {workdir}; {os.cpu_count()} CPUs, load average {load}")
    print("peak RSS = VmHWM of the stage process (`python -m stages.X` under a runpy wrapper)\n", flush=True)
    try:
        for case in cases:
            case.import_kb = import_peak_kb(case.module)
            base = case.quick if args.quick else max(1, round(case.size * args.scale))
            for factor in (1, 4):
                ws = workdir / f"{case.name.replace('@', '-')}-{factor}x"
                ws.mkdir(parents=True)
                t0 = time.perf_counter()
                info = case.setup(ws, base * factor)
                made = time.perf_counter() - t0
                run = run_stage(ws, case.module, case.args, ws / "stage.log", args.timeout)
                case.results[factor] = {"size": base * factor, **info, **run}
                print(
                    f"{case.name} {factor}x: {base * factor:,} {case.unit}, {info['proposals']:,} proposals, "
                    f"{_bytes(info['bytes'])} of data (made in {made:.0f} s); peak RSS {_gb(run['self_kb'])} "
                    f"in {run['seconds']:.0f} s",
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(ws)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(cases)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nTotal {time.perf_counter() - started:.0f} s (load average at the end {load}).")


if __name__ == "__main__":
    main()
