"""The cluster stage (stages/cluster.py) on a small embeddings store: it reads the store by blocks (the zarr array
itself), runs only k when k is fixed, and with k = auto writes the sweep's curve and the elbow run (re-run with
the same seed: identical to its sweep run and to k-means on the numpy array); under torchrun the sweep is dealt
to the ranks and the outputs keep one process's bytes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.geometry import hyperbolic as hyp
from pipeline.geometry.kmeans import kmeans, knee
from pipeline.stores.store import StoreWriter, atomic_path, open_store, read_array

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """data/val/embeddings.zarr (four blobs in the unit ball, float32) and params.yaml; the working directory."""
    rng = np.random.default_rng(5)
    centres = np.eye(6)[:4] * 0.6
    x = np.concatenate([hyp.expmap(np.broadcast_to(m, (150, 6)), rng.normal(size=(150, 6)) * 0.05) for m in centres])
    path = tmp_path / "data/val/embeddings.zarr"
    path.parent.mkdir(parents=True)
    with atomic_path(path) as tmp:
        writer = StoreWriter(tmp)
        writer.write_array("embeddings", x.astype(np.float32))
        writer.finish({"split": "val", "geometry": "poincare", "curvature": 1.0}, "embeddings")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(workdir: Path, dist: dict | None = None, **cluster) -> None:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["cluster"].update(cluster)
    p.setdefault("dist", {}).update(dist or {})
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))


def run_stage(workdir: Path, **cluster) -> tuple[list[list[str]], dict, dict]:
    from stages import cluster as stage

    write_params(workdir, **cluster)
    stage.main(params_file="params.yaml")
    rows = list(csv.reader((workdir / "plots/cluster/elbow.csv").open()))
    assert (workdir / "plots/cluster/elbow.png").stat().st_size > 0
    store = open_store(workdir / "data/val/clusters.zarr", "clusters")
    arrays = {name: read_array(store, name) for name in ("assignment", "distance", "centroids")}
    return rows, dict(store.attrs), arrays


def reference(workdir: Path, k: int, **options):
    x = read_array(open_store(workdir / "data/val/embeddings.zarr", "embeddings"), "embeddings")
    return kmeans(x, k, geometry="poincare", c=1.0, **options)


def test_fixed_k_runs_only_that_k(workdir, monkeypatch):
    from pipeline.geometry import kmeans as km

    ks = []
    real = km.hyperbolic_kmeans
    monkeypatch.setattr(km, "hyperbolic_kmeans", lambda x, k, **kw: ks.append(k) or real(x, k, **kw))
    rows, attrs, arrays = run_stage(workdir, k=3, k_range=[2, 8, 2], max_iter=50)
    assert ks == [3]  # no sweep
    assert attrs["elbow_k"] is None and attrs["K"] == 3 and attrs["k_choice"] == "fixed"
    assert rows[0] == ["k", "inertia"] and len(rows) == 2
    assert int(rows[1][0]) == 3 and float(rows[1][1]) == attrs["inertia"]
    ref = reference(workdir, 3, seed=0, max_iter=50, tol=1e-6)
    np.testing.assert_array_equal(arrays["assignment"], ref.assignment)
    np.testing.assert_array_equal(arrays["centroids"], ref.centroids)


def test_auto_k_sweeps_and_keeps_the_elbow_run(workdir):
    rows, attrs, arrays = run_stage(workdir, k="auto", k_range=[2, 8, 2], max_iter=50)
    curve = [(int(k), float(v)) for k, v in rows[1:]]
    assert [k for k, _ in curve] == [2, 4, 6, 8]
    elbow = knee([k for k, _ in curve], [v for _, v in curve])
    assert attrs["elbow_k"] == attrs["K"] == elbow and attrs["k_choice"] == "elbow"
    assert dict(curve)[elbow] == attrs["inertia"]  # the re-run is the sweep's run
    ref = reference(workdir, elbow, seed=0, max_iter=50, tol=1e-6)
    np.testing.assert_array_equal(arrays["assignment"], ref.assignment)
    np.testing.assert_array_equal(arrays["distance"], ref.distance)
    np.testing.assert_array_equal(arrays["centroids"], ref.centroids)
    assert attrs["counts"] == {"points": 600, "clusters": elbow, "nonempty": elbow}


def outputs(workdir: Path) -> dict[str, bytes]:
    """Every file the stage writes: the clusters store and the elbow curve, by path."""
    files = sorted((workdir / "data/val/clusters.zarr").rglob("*")) + sorted((workdir / "plots").rglob("*"))
    return {str(p.relative_to(workdir)): p.read_bytes() for p in files if p.is_file()}


def test_torchrun_deals_the_sweep_to_the_ranks_and_keeps_the_bytes(workdir):
    """`torchrun --nproc_per_node 2 -m stages.cluster` (gloo, CPU) and `dist.nproc: 2`: each rank sweeps every
    other k, rank 0 alone picks the elbow and writes; the store and plots have the one-process run's bytes."""
    write_params(workdir, k="auto", k_range=[2, 8, 2], max_iter=50)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}

    def stage(*command: str) -> str:
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout + done.stderr

    one = stage(str(BIN / "python"), "-m", "stages.cluster")
    assert "over 2 ranks" not in one and "sweeps k" not in one
    reference = outputs(workdir)
    assert len(reference) >= 4  # the store's files, elbow.csv, elbow.png
    for path in reference:
        (workdir / path).unlink()

    two = stage(str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "stages.cluster")
    assert "rank 0 of 2 sweeps k = [2, 6]" in two and "rank 1 of 2 sweeps k = [4, 8]" in two
    assert two.count("[cluster] ") == 1 and "over 2 ranks" in two  # one summary line: rank 0's
    assert outputs(workdir) == reference

    write_params(workdir, dist={"nproc": 2}, k="auto", k_range=[2, 8, 2], max_iter=50)  # how `dvc repro` runs it
    launched = stage(str(BIN / "python"), "-m", "stages.cluster")
    assert "rank 1 of 2 sweeps k = [4, 8]" in launched
    assert outputs(workdir) == reference
