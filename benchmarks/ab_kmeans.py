"""A/B of the nearest-centroid assignment between two checkouts, in one process (a script, not a test).

On a shared machine two runs of bench_kmeans.py a minute apart can differ by 20 % (other tenants' load), more
than most changes to the search. This imports the assignment of another checkout (``--before``, e.g. made with
``git worktree add /tmp/before <commit>`` and its kernel built there with ``python setup.py build_ext
--inplace``) next to this one's, its ``pipeline`` package copied to a temporary folder as ``pipeline_before``,
and times the two and faiss' k = 1 search (``IndexFlatL2``, float32) of the same arrays in turn, ``--repeat``
rounds, so that every round sees the same load; the best of each is kept. The arrays are bench_kmeans.py's
synthetic ones (N = 200,000, K = 1,462, d = 16, radii to 1 - |x| = 1e-3 by default). Prints a table with each
one's time, its ratio to faiss and after / before, and whether the assignments and distances are bit-identical.

    python benchmarks/ab_kmeans.py --before /tmp/before               # 2 threads, both geometries
    python benchmarks/ab_kmeans.py --before /tmp/before --threads 1 --repeat 9
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (its kernel built)")
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss / BLAS / OpenMP threads")
    parser.add_argument("--repeat", type=int, default=15, help="rounds (the best of each is kept)")
    parser.add_argument("--n", type=int, default=200_000, help="points")
    parser.add_argument("--k", type=int, default=1462, help="centroids")
    parser.add_argument("--d", type=int, default=16, help="dimension")
    parser.add_argument("--max-radius", type=float, default=7.6, help="largest distance of a point from the origin")
    parser.add_argument("--geometries", default="poincare,euclidean", help="comma-separated")
    return parser.parse_args()


ARGS = parse_args()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def copy_as(package: Path, name: str, folder: Path) -> None:
    """``package`` copied into ``folder`` under ``name``, its absolute imports of itself renamed."""
    target = folder / name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
    pattern = re.compile(rf"\b(from|import) {package.name}([. ])")
    for path in target.rglob("*.py"):
        path.write_text(pattern.sub(rf"\1 {name}\2", path.read_text()))


def digest(assignment: np.ndarray, distance: np.ndarray) -> str:
    return hashlib.md5(assignment.tobytes() + distance.tobytes()).hexdigest()


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    faiss.omp_set_num_threads(ARGS.threads)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    with tempfile.TemporaryDirectory() as tmp:
        copy_as(ARGS.before.resolve() / "pipeline", "pipeline_before", Path(tmp))
        sys.path.insert(0, tmp)
        sys.argv = sys.argv[:1]  # bench_kmeans parses its own arguments when imported
        from bench_kmeans import synthetic
        from pipeline_before.geometry import kmeans_fused as kmeans_fused_before
        from pipeline_before.geometry.kmeans import assign as before

        from pipeline.geometry import kmeans_fused
        from pipeline.geometry.kmeans import assign as after

        print(
            f"## kmeans.assign, {ARGS.before} (before) against {ROOT} (after): N={ARGS.n}, K={ARGS.k}, d={ARGS.d}, "
            f"{ARGS.threads} threads, best of {ARGS.repeat} interleaved rounds; kernels {kmeans_fused_before.width()} "
            f"and {kmeans_fused.width()} bits\n"
        )
        print(
            "| geometry | faiss k=1 (s) | before (s) | before / faiss | after (s) | after / faiss | after / before | "
            "identical | load |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        x, cent = synthetic(ARGS.n, ARGS.k, ARGS.d, 0, ARGS.max_radius)
        index = faiss.IndexFlatL2(ARGS.d)
        index.add(cent.astype(np.float32))
        x32 = x.astype(np.float32)
        for geometry in ARGS.geometries.split(","):
            before(x[:1000], cent, geometry=geometry)  # warm-up: thread pools, kernels
            after(x[:1000], cent, geometry=geometry)
            times: dict[str, list[float]] = {"before": [], "faiss": [], "after": []}
            digests = {}
            for _ in range(ARGS.repeat):
                for name, fn in (("before", before), ("faiss", None), ("after", after)):
                    start = time.perf_counter()
                    if fn is None:
                        index.search(x32, 1)
                    else:
                        digests[name] = digest(*fn(x, cent, geometry=geometry))
                    times[name].append(time.perf_counter() - start)
            b, f, a = (min(times[name]) for name in ("before", "faiss", "after"))
            same = "yes" if digests["before"] == digests["after"] else "**no**"
            print(
                f"| {geometry} | {f:.4f} | {b:.4f} | {b / f:.2f}x | {a:.4f} | {a / f:.2f}x | {a / b:.3f} | {same} | "
                f"{os.getloadavg()[0]:.2f} |"
            )


if __name__ == "__main__":
    main()
