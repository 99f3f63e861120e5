"""What `prepare`'s per-record field checks cost on an LVIS v1-shaped train file (a script, not a test).

`pipeline.data.lvis_format.validate_lvis` streams the annotations once; for each it checks the ids and
references and, through `pipeline.data.annotation_fields`, the fields later stages rely on (bbox, area,
iscrowd, every polygon coordinate). This script fabricates an LVIS v1 train-shaped file with
benchmarks/memory_inputs.py (12.7 annotations per image, one polygon of 50 points each, 1,203 categories),
times `validate_lvis` on it with the field checks and without them (`annotation_problem` and
`short_polygon_count` replaced by no-ops), alternating the two `--repeats` times, and prints a Markdown table:
median seconds, annotations per second, the ratio checked / unchecked measured in the same run, and both
projected linearly to LVIS v1 train (1,270,141 annotations).

    python benchmarks/bench_prepare.py                 # 10,000 images, ~127 k annotations (~1 min on 2 CPUs)
    python benchmarks/bench_prepare.py --images 2000   # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

import benchmarks.memory_inputs as inputs  # noqa: E402
import pipeline.data.lvis_format as lvis_format  # noqa: E402

LVIS_TRAIN_ANNOTATIONS = 1_270_141


def _time_validate(path: Path, checked: bool) -> tuple[float, int]:
    saved = lvis_format.annotation_problem, lvis_format.short_polygon_count
    if not checked:
        lvis_format.annotation_problem = lambda *args: None
        lvis_format.short_polygon_count = lambda *args: 0
    try:
        start = time.perf_counter()
        data = lvis_format.validate_lvis(path)
        return time.perf_counter() - start, data.n_annotations
    finally:
        lvis_format.annotation_problem, lvis_format.short_polygon_count = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="LVIS train images to fabricate")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant, alternated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = inputs.make_dataset(Path(tmp), args.images, 0, 0, 640, link_limit=1)
        size_mb = data.train_json.stat().st_size / inputs.MB
        times: dict[str, list[float]] = {"unchecked": [], "checked": []}
        n = 0
        for _ in range(args.repeats):
            for name in ("unchecked", "checked"):
                seconds, n = _time_validate(data.train_json, checked=name == "checked")
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"validate_lvis on a fabricated LVIS train file: {args.images:,} images, {n:,} annotations, {size_mb:.0f} MB")
    print()
    print("| variant | median s | annotations/s | projected to LVIS v1 train (1.27 M annotations) |")
    print("|---|---|---|---|")
    for name, seconds in median.items():
        projected = seconds * LVIS_TRAIN_ANNOTATIONS / n
        print(f"| {name} | {seconds:.2f} | {n / seconds:,.0f} | {projected:.0f} s |")
    print()
    print(f"checked / unchecked: {median['checked'] / median['unchecked']:.2f}x ({args.repeats} runs each)")


if __name__ == "__main__":
    main()
