"""Benchmark of the sample stage (a script, not a test).

1. Pair finding for one image: the vectorised rules (one matmul, pipeline.geometry.relations.relations) against a
   naive Python double loop over pairs, for 20 random masks at 128x128 and at 640x480, plus the
   `max_side` downscale option.
2. Feature extraction throughput (proposals/s; three crops per proposal, one forward) with ``--backbone``
   (resnet18) at crop sizes 64 and 224, split into crop time and backbone time.
3. Paste and crop on the val split's own proposals (data/val/proposals.zarr, `make repro` first), against
   torchvision's paste loop (an image-sized paste per mask) with one roi_align per foreground window: the
   stage's default on the device (the CPU: each mask resized inside its box, one roi_align per window), the
   batched products with all crops at once (`paste_masks_tensor(batched=True)`, `crop_views(batched=True)`: a
   GPU's default), and the same with the tied masks (a pixel within 2e-6 of the threshold) pasted whole by
   torchvision as before 2026-11-27 instead of inside their boxes; ms per image, proposals/s and how many
   masks were tied; the outputs are checked bit-identical. Untimed first: the first mode over every image (the
   paste checks torch's bilinear weights once per process, up to the largest box yet pasted), then every mode on
   two images (a GPU's first kernel calls). Without it the first mode paid them: 14.8 against 8.1 ms an image for
   the same batched paste on a lent H200, and 21.6 against 14.1 with a warm-up of two images only.
4. The whole `sample_split` over the val split, images read from disk as the stage does, for each way of
   running it: baseline (all at once on the device, images decoded in this process, float32), paste and
   crop one proposal at a time, N DataLoader workers decoding ahead (pinned only on CUDA), the backbone
   under bf16 / fp16 autocast (fp16 on a CPU only where this torch build has it), workers + bf16; images/s
   and proposals/s with the ratio to the baseline, and for amp the largest feature difference to float32's.
5. Where `sample_split`'s time goes, run as the stage runs it by default (`num_workers: auto`: up to 4
   decoding workers on a GPU, none on the CPU), once: cProfile's functions by own time (the main process'), and on CUDA
   torch.profiler's operators by device time and the share of the wall time the device was busy.
6. `sample_parts` (the stage's loop over parts) in parts of ``--images-per-part`` images with ``--workers``
   decoding workers: one set of workers for all the parts against a new set for every part (before 2026-11-27).

Sections 3, 4 and 6 run every mode once per round, `--repeat` rounds interleaved, and report each mode's best
round: a busy neighbour on a shared machine slows every mode alike.

    python benchmarks/bench_sample.py [--threads 2] [--device cpu] [--reps 3] [--repeat 3] [--workers 2]
                                      [--sections 12345] [--images N] [--crop 64] [--backbone resnet18]
                                      [--images-per-part 16]

Sections 3 and 4 crop ``--crop`` pixels (the embedded world's 64; LVIS' 224) and pool with the backbone of
models/proposer.pt (resnet18 at random without one), as the stage does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from pipeline.geometry.relations import relations  # noqa: E402
from pipeline.models.features import build_backbone, crop_views, pool_features  # noqa: E402


def random_masks(n: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n filled ellipses of varied size (so that some overlap and nest), and their boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((n, height, width), dtype=bool)
    boxes = np.zeros((n, 4), dtype=np.float32)
    for k in range(n):
        ry = rng.uniform(0.05, 0.4) * height
        rx = rng.uniform(0.05, 0.4) * width
        cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
        masks[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ys, xs = np.nonzero(masks[k])
        boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return masks, boxes


def naive_pairs(masks: np.ndarray, iou_thresh: float, containment: float) -> tuple[list, list]:
    n = len(masks)
    area = [int(m.sum()) for m in masks]
    obj, hier = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            inter = int(np.logical_and(masks[i], masks[j]).sum())
            union = area[i] + area[j] - inter
            if i < j and area[i] and area[j] and inter / union > iou_thresh:
                obj.append((i, j))
            if area[j] and area[j] < area[i] and inter / area[j] >= containment:
                hier.append((i, j))
    return obj, hier


def best_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_pairs(reps: int) -> None:
    print(f"\n## Pair finding, 20 masks per image (best of {reps}, ms per image)\n")
    print(f"| {'masks':>9} | {'naive loop':>10} | {'vectorised':>10} | {'speed-up':>8} | {'max_side=160':>12} |")
    print(f"|{'-' * 11}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 14}|")
    for height, width in [(128, 128), (480, 640)]:
        masks, _ = random_masks(20, height, width)
        ref_obj, ref_hier = naive_pairs(masks, 0.4, 0.95)
        obj, hier = relations(masks, object_iou=0.4, hier_containment=0.95)
        assert obj.tolist() == [list(p) for p in ref_obj] and hier.tolist() == [list(p) for p in ref_hier]
        t_naive = best_time(lambda m=masks: naive_pairs(m, 0.4, 0.95), reps)
        t_vec = best_time(lambda m=masks: relations(m, object_iou=0.4, hier_containment=0.95), reps)
        t_small = best_time(lambda m=masks: relations(m, object_iou=0.4, hier_containment=0.95, max_side=160), reps)
        print(
            f"| {height:>4}x{width:<4} | {t_naive * 1e3:>10.2f} | {t_vec * 1e3:>10.2f} | "
            f"{t_naive / t_vec:>7.1f}x | {t_small * 1e3:>12.2f} |"
        )
        print(f"|   pairs: object {len(obj)}, hier {len(hier)} |", flush=True)


def bench_features(reps: int, device: str, name: str) -> None:
    backbone = build_backbone(name, "random", seed=0).to(device)
    image = np.random.default_rng(1).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    masks, boxes = random_masks(20, 480, 640, seed=2)
    n = len(boxes)
    print(f"\n## Feature extraction, {name} on {device}, one 480x640 image with {n} proposals (best of {reps})\n")
    print(f"| {'crop':>4} | {'crops ms':>8} | {'forward ms':>10} | {'proposals/s':>11} | {'views/s':>8} |")
    print(f"|{'-' * 6}|{'-' * 10}|{'-' * 12}|{'-' * 13}|{'-' * 10}|")
    results = {}
    for size in (64, 224):
        views = torch.cat(crop_views(image, boxes, masks, size, device=device))
        t_crop = best_time(lambda s=size: crop_views(image, boxes, masks, s, device=device), reps)
        t_fwd = best_time(lambda v=views: pool_features(backbone, v, len(v), device), reps)
        results[size] = n / (t_crop + t_fwd)
        print(
            f"| {size:>4} | {t_crop * 1e3:>8.1f} | {t_fwd * 1e3:>10.1f} | {results[size]:>11.1f} | "
            f"{3 * results[size]:>8.1f} |",
            flush=True,
        )
    print(f"\nthroughput ratio crop 64 / crop 224: {results[64] / results[224]:.1f}x")


def _val_split(n_images: int | None = None):
    """The first `n_images` images of the val split (all: None): proposals, image loader and a
    proposer-initialised backbone of the proposer's own architecture (random resnet18 without a proposer)."""
    import os

    import zarr

    from pipeline.data.dataset import read_manifest
    from stages.common import image_loader

    os.chdir(ROOT)  # the manifest's paths are relative to the repository
    group = zarr.open_group(ROOT / "data/val/proposals.zarr", mode="r")
    arrays = {
        name: np.asarray(group[name][...]) for name in ("image_ids", "image_hw", "image_offsets", "boxes", "masks")
    }
    load = image_loader(read_manifest(ROOT / "data/prepared/dataset.json"), "val", arrays["image_ids"])
    if n_images is not None:
        last = int(arrays["image_offsets"][n_images])
        arrays["image_offsets"] = arrays["image_offsets"][: n_images + 1]
        arrays["image_hw"] = arrays["image_hw"][:n_images]
        arrays["boxes"], arrays["masks"] = arrays["boxes"][:last], arrays["masks"][:last]
    checkpoint = ROOT / "models/proposer.pt"
    if checkpoint.is_file():
        name = torch.load(checkpoint, map_location="cpu", weights_only=True)["backbone"]
        backbone = build_backbone(name, "proposer", seed=0, proposer_checkpoint=checkpoint)
    else:
        backbone = build_backbone("resnet18", "random", seed=0)
    return arrays, load, backbone


def _rounds(modes: dict, run, repeat: int) -> dict:
    """Best (shortest) result of each mode over `repeat` interleaved rounds; run(mode) -> dict with seconds."""
    best = {}
    for _ in range(max(1, repeat)):
        for name, mode in modes.items():
            row = run(mode)
            if "error" in row or name not in best or row["seconds"] < best[name]["seconds"]:
                best[name] = row
    return best


def bench_paste_crop(repeat: int, device: str, n_images: int | None, crop: int) -> None:
    from pipeline.geometry import paste
    from pipeline.geometry.paste import paste_masks_reference, paste_masks_tensor

    in_boxes, tied = paste._paste_in_boxes, []

    def counted(maps, *args):  # the masks with a pixel within TIE_TOLERANCE of the threshold
        tied.append(len(maps))
        return in_boxes(maps, *args)

    def whole(maps, box_t, hw_i, threshold):  # ties as before 2026-11-27: torchvision's paste of the whole image
        full = paste_masks_reference(maps, box_t, hw_i, threshold)
        return [((slice(None), slice(None)), mask) for mask in full]

    arrays, load, _ = _val_split(n_images)
    offsets, hw, boxes, masks = arrays["image_offsets"], arrays["image_hw"], arrays["boxes"], arrays["masks"]
    todo = [i for i in range(len(offsets) - 1) if offsets[i + 1] > offsets[i]]
    images = {i: load(i) for i in todo}
    n_props = int(offsets[-1])

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(mode: dict, which: list[int] = todo) -> dict:
        paste._paste_in_boxes = whole if mode.get("whole") else counted
        try:
            return timed(mode, which)
        finally:
            paste._paste_in_boxes = in_boxes

    def timed(mode: dict, which: list[int] = todo) -> dict:
        outputs = []
        tied.clear()
        paste_s = crop_s = 0.0
        for i in which:
            s, e = int(offsets[i]), int(offsets[i + 1])
            box_t = torch.from_numpy(boxes[s:e]).to(device)
            map_t = torch.from_numpy(masks[s:e]).to(device)
            sync()
            t0 = time.perf_counter()
            if mode["paste"] == "reference":
                full = paste_masks_reference(map_t, box_t, tuple(hw[i])).to(device)
            else:
                full = paste_masks_tensor(map_t, box_t, tuple(hw[i]), device=device, batched=mode["batched"])
            sync()
            t1 = time.perf_counter()
            views = crop_views(images[i], box_t, full, crop, device=device, batched=mode["batched"])
            sync()
            crop_s += time.perf_counter() - t1
            paste_s += t1 - t0
            outputs.append((full.cpu(), [v.cpu() for v in views]))
        return {"seconds": paste_s + crop_s, "paste": paste_s, "crop": crop_s, "outputs": outputs, "tied": sum(tied)}

    loop_name = "torchvision's whole-image paste, one crop at a time (loop)"
    modes = {
        "the stage's default on this device": {"paste": "default", "batched": None},
        "batched products, all crops at once (a GPU's default)": {"paste": "default", "batched": True},
        "batched, tied masks pasted whole (before 2026-11-27)": {"paste": "default", "batched": True, "whole": True},
        loop_name: {"paste": "reference", "batched": False},
    }
    # warm-up, untimed: the check of torch's bilinear weights (once per process, up to the largest box pasted:
    # 0.24 s here at 800 px) over every image, then each mode's first kernel calls on two images
    for n, mode in enumerate(modes.values()):
        run(mode, todo if n == 0 else todo[:2])
    best = _rounds(modes, run, repeat)
    a, *others = (best[name]["outputs"] for name in modes)
    same = all(
        torch.equal(x[0], y[0]) and all(torch.equal(u, v) for u, v in zip(x[1], y[1], strict=True))
        for b in others
        for x, y in zip(a, b, strict=True)
    )
    print(
        f"\n## Paste + crop ({crop} px) of the val split's {n_props} proposals on {len(todo)} images, {device} "
        f"(best of {repeat})\n"
    )
    print("| mode | paste ms/image | crop ms/image | proposals/s | vs loop |")
    print("|---|---:|---:|---:|---:|")
    loop = best[loop_name]["seconds"]
    for name, row in best.items():
        print(
            f"| {name} | {1e3 * row['paste'] / len(todo):.2f} | {1e3 * row['crop'] / len(todo):.2f} | "
            f"{n_props / row['seconds']:.0f} | {loop / row['seconds']:.2f}x |"
        )
    print(f"\nmasks and views bit-identical between the {len(modes)}: {same}")
    tied = best["batched products, all crops at once (a GPU's default)"]["tied"]
    print(f"masks with a pixel within 2e-6 of the threshold (resized again by torchvision): {tied} of {n_props}")


def _split_call(device: str, n_images: int | None, crop: int) -> tuple:
    """The val split's `sample_split` arguments, as the stage passes them: ``(args, keywords, images, proposals)``."""
    arrays, load, backbone = _val_split(n_images)
    offsets = arrays["image_offsets"]
    args = (load, arrays["image_hw"], offsets, arrays["boxes"], arrays["masks"], backbone)
    kw = {"crop_size": crop, "object_iou": 0.4, "hier_containment": 1.0, "relation_max_side": None, "batch_size": 128}
    kw |= {"hier_exclude_objects": True, "device": device, "progress": False}
    return args, kw, int(np.count_nonzero(np.diff(offsets))), int(offsets[-1])


def bench_split(repeat: int, device: str, workers: int, n_images: int | None, crop: int) -> None:
    from pipeline.errors import PipelineError
    from pipeline.stores.sampling import sample_split

    args, kw, n_images, n_props = _split_call(device, n_images, crop)
    offsets = args[2]

    def run(mode: dict) -> dict:
        try:
            sample_split(*args[:2], offsets[:2], *args[3:], **kw, amp=mode["amp"])  # warm-up (and amp support)
        except PipelineError as err:
            return {"error": str(err)}
        start = time.perf_counter()
        out = sample_split(*args, **kw, **mode)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return {
            "seconds": time.perf_counter() - start,
            "features": out.features,
            "pairs": (out.object_pairs, out.hier_pairs),
        }

    base = {"vectorised": True, "num_workers": 0, "amp": "off"}
    modes = {
        "baseline (all at once)": base,
        "paste + crop one at a time": {**base, "vectorised": False},
        "workers 1": {**base, "num_workers": 1},
        f"workers {workers}": {**base, "num_workers": workers},
        "amp bf16": {**base, "amp": "bf16"},
        "amp fp16": {**base, "amp": "fp16"},
        f"workers {workers} + bf16": {**base, "num_workers": workers, "amp": "bf16"},
    }
    best = _rounds(modes, run, repeat)
    ref = best["baseline (all at once)"]
    print(
        f"\n## sample_split over the val split: {n_props} proposals on {n_images} images, crop {crop}, {device} "
        f"(best of {repeat})\n"
    )
    print("| mode | images/s | proposals/s | vs baseline | same pairs | max feature diff vs baseline |")
    print("|---|---:|---:|---:|---|---:|")
    for name, row in best.items():
        if "error" in row:
            print(f"| {name} | n/a | n/a | n/a | n/a | {row['error']} |")
            continue
        pairs = all(np.array_equal(a, b) for a, b in zip(row["pairs"], ref["pairs"], strict=True))
        scale = max(float(np.abs(ref["features"][v]).max()) for v in ref["features"])
        diff = max(float(np.abs(row["features"][v] - ref["features"][v]).max()) for v in ref["features"]) / scale
        print(
            f"| {name} | {n_images / row['seconds']:.1f} | {n_props / row['seconds']:.0f} | "
            f"{ref['seconds'] / row['seconds']:.2f}x | {'yes' if pairs else 'no'} | {diff:.1e} |"
        )
    print("\n(max feature diff: the largest absolute difference over the three views, relative to the largest feature)")


def profile_split(device: str, n_images: int | None, crop: int, rows: int = 18) -> None:
    """Section 5: one `sample_split` as the stage runs it by default (`sample.num_workers: auto`: decoding workers
    on a GPU, none on the CPU) under cProfile (functions by own time), then on CUDA under torch.profiler (operators
    by device time; the device's busy share of the wall time)."""
    import cProfile
    import io
    import pstats

    from pipeline.models.inference import decoding_workers
    from pipeline.stores.sampling import sample_split

    args, kw, n_images, n_props = _split_call(device, n_images, crop)
    workers = decoding_workers("auto", device)
    kw = {**kw, "num_workers": workers}
    sample_split(*args[:2], args[2][:2], *args[3:], **kw)  # warm-up
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(sample_split, *args, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    body = text.getvalue()
    body = body[body.find("ncalls") :] if "ncalls" in body else body
    print(
        f"\n## Where sample_split's time goes: {n_props} proposals on {n_images} images, {device}, "
        f"{workers} decoding workers (the stage's default), {wall:.2f} s\n"
    )
    print(f"cProfile, the {rows} functions of largest own time (tottime; the profiler's overhead included):\n")
    print(f"```\n{body.rstrip()}\n```")
    if not device.startswith("cuda"):
        return
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            sample_split(*args, **kw)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        averages = prof.key_averages()
        busy = sum(e.self_device_time_total for e in averages) / 1e6
        table = averages.table(sort_by="self_device_time_total", row_limit=12)
    except Exception as error:  # noqa: BLE001 (the tables above stand without it)
        print(f"\ntorch.profiler failed: {error!r}")
        return
    print(f"\ntorch.profiler: device busy {busy:.2f} s of {wall:.2f} s wall ({100 * busy / wall:.0f} %)\n")
    print(f"```\n{table.rstrip()}\n```")


def bench_parts(repeat: int, device: str, workers: int, n_images: int | None, crop: int, per_part: int) -> None:
    """Section 6: `sample_parts` over the val split in parts of `per_part` images with `workers` decoding workers:
    one set of workers for all the parts (the stage since 2026-11-27) against a new set for every part (before:
    each part's `sample_split` made its own DataLoader). The stores are checked identical."""
    import shutil
    import tempfile

    from pipeline.stores.parts import ImageParts
    from pipeline.stores.sampling import PAIR_COLUMNS, sample_columns, sample_parts
    from pipeline.stores.store import open_store, read_array

    args, kw, n_used, n_props = _split_call(device, n_images, crop)
    load, hw, offsets, boxes, masks, backbone = args
    proposals = {"image_offsets": offsets, "image_hw": hw, "boxes": boxes, "masks": masks}
    kw = {k: v for k, v in kw.items() if k != "progress"}
    n = len(offsets) - 1
    scratch = Path(tempfile.mkdtemp(prefix="bench_parts_"))

    class OnePart:  # the parts object as before: sample_parts called once per part, so its workers start again
        def __init__(self, parts: ImageParts, part: tuple[int, int]) -> None:
            self.parts, self.part = parts, part

        def pending(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
            return [self.part]

        def write(self, *a, **k) -> None:
            self.parts.write(*a, **k)

    def run(mode: dict) -> dict:
        out = scratch / f"{mode['name']}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.parts", ignore_errors=True)
        columns = sample_columns(backbone.dim, "float32")
        parts = ImageParts(out, {}, columns, n, images_per_part=per_part, index_columns=PAIR_COLUMNS)
        call = {"dtype": "float32", "num_workers": workers, "progress": False, **kw}
        start = time.perf_counter()
        if mode["per_part"]:
            for part in parts.pending():
                sample_parts(OnePart(parts, part), proposals, load, backbone, **call)
        else:
            sample_parts(parts, proposals, load, backbone, **call)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        parts.assemble({}, kind="samples")
        store = open_store(out, "samples")
        return {"seconds": seconds, "arrays": {name: read_array(store, name) for name in [*columns, "image_offsets"]}}

    modes = {
        f"one set of {workers} workers for all parts": {"name": "stream", "per_part": False},
        f"a set of {workers} workers per part (before)": {"name": "per_part", "per_part": True},
    }
    try:
        run(next(iter(modes.values())))  # warm-up, untimed: first kernel calls, the paste's check of torch's weights
        best = _rounds(modes, run, repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (a, b) = (best[name]["arrays"] for name in modes)
    same = all(np.array_equal(a[k], b[k]) for k in a)
    n_parts = -(-n // per_part)
    print(
        f"\n## sample_parts over the val split: {n_props} proposals on {n_used} images in {n_parts} parts of "
        f"{per_part} images, {workers} decoding workers, {device} (best of {repeat})\n"
    )
    print("| mode | seconds | images/s | vs per part |")
    print("|---|---:|---:|---:|")
    base = best[list(modes)[1]]["seconds"]
    for name, row in best.items():
        print(f"| {name} | {row['seconds']:.2f} | {n_used / row['seconds']:.1f} | {base / row['seconds']:.2f}x |")
    print(f"\nstores identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of sections 3 and 4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sections", default="1234", help="which sections to run (5: the profile, 6: parts)")
    parser.add_argument("--images-per-part", type=int, default=16, help="section 6's part size (the stage: 256)")
    parser.add_argument("--images", type=int, help="the first N val images in sections 3 and 4 (default: all)")
    parser.add_argument("--backbone", default="resnet18", help="section 2's network (LVIS: resnet50)")
    parser.add_argument("--crop", type=int, default=64, help="crop size of sections 3 and 4 (LVIS: 224)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "1" in args.sections:
        bench_pairs(args.reps)
    if "2" in args.sections:
        bench_features(args.reps, args.device, args.backbone)
    if "3" in args.sections:
        bench_paste_crop(args.repeat, args.device, args.images, args.crop)
    if "4" in args.sections:
        bench_split(args.repeat, args.device, args.workers, args.images, args.crop)
    if "5" in args.sections:
        profile_split(args.device, args.images, args.crop)
    if "6" in args.sections:
        bench_parts(args.repeat, args.device, max(1, args.workers), args.images, args.crop, args.images_per_part)


if __name__ == "__main__":
    main()
