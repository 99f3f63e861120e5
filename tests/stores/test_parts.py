"""pipeline.stores.parts: stores assembled from parts of whole images, resumable and shardable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stores.parts import Column, ImageParts, part_ranges
from pipeline.stores.store import offsets_from_counts, open_store, read_array, write_store

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = {
    "image_ids": Column("int64", (), per_image=True),
    "features": Column("float16", (8,)),
    "pairs": Column("int64", (2,)),
}


def world(n_images: int, seed: int = 0):
    """Per-image rows, features and within-image pairs (local row indices) of a fake split."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, size=n_images)
    images = []
    for i, c in enumerate(counts):
        pairs = np.array([(a, b) for a in range(c) for b in range(a + 1, c)], dtype=np.int64).reshape(-1, 2)
        images.append({"id": 1000 + i, "features": rng.normal(size=(c, 8)).astype(np.float16), "pairs": pairs})
    return counts, images


def write_part(parts, images, start, stop):
    chunk = images[start:stop]
    counts = np.array([len(im["features"]) for im in chunk], dtype=np.int64)
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(chunk) else np.zeros(0, np.int64)
    pairs = [im["pairs"] + f for im, f in zip(chunk, firsts, strict=True)]
    parts.write(
        start,
        stop,
        counts,
        {
            "image_ids": np.array([im["id"] for im in chunk], dtype=np.int64),
            "features": np.concatenate([im["features"] for im in chunk]),
            "pairs": np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64),
        },
    )


def whole(images):
    counts = [len(im["features"]) for im in images]
    offsets = offsets_from_counts(counts)
    return {
        "image_offsets": offsets,
        "image_ids": np.array([im["id"] for im in images], dtype=np.int64),
        "features": np.concatenate([im["features"] for im in images]),
        "pairs": np.concatenate([im["pairs"] + offsets[i] for i, im in enumerate(images)]),
    }


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_part_ranges_cover_the_split():
    assert part_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert part_ranges(0, 4) == []


def test_assembled_store_equals_the_store_of_whole_arrays(tmp_path):
    _, images = world(37)
    parts = ImageParts(tmp_path / "s.zarr", {"p": 1}, COLUMNS, len(images), images_per_part=5, index_columns=("pairs",))
    for start, stop in reversed(parts.pending()):  # any order
        write_part(parts, images, start, stop)
    fingerprint = parts.assemble({"split": "val"}, kind="samples")
    reference = write_store(tmp_path / "ref.zarr", whole(images), {"split": "val"}, kind="samples")
    assert fingerprint == reference
    assert files(tmp_path / "s.zarr") == files(tmp_path / "ref.zarr")
    parts.remove()
    assert not parts.work.exists()  # the work folder is gone once the stage is done
    group = open_store(tmp_path / "s.zarr", "samples")
    assert np.array_equal(read_array(group, "pairs"), whole(images)["pairs"])


def test_the_store_does_not_depend_on_how_images_are_split_among_ranks(tmp_path):
    _, images = world(23, seed=3)
    stores = []
    for world_size in (1, 3):
        out = tmp_path / f"w{world_size}" / "s.zarr"
        parts = ImageParts(out, {}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
        shares = [parts.pending(rank, world_size) for rank in range(world_size)]
        assert sorted(r for share in shares for r in share) == parts.ranges
        for share in shares:
            for start, stop in share:
                write_part(parts, images, start, stop)
        parts.assemble({}, kind="samples")
        stores.append(files(out))
    assert stores[0] == stores[1]


def test_finished_parts_are_kept_and_parts_of_another_run_are_not(tmp_path):
    _, images = world(12)
    out = tmp_path / "s.zarr"
    parts = ImageParts(out, {"lr": 1}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    write_part(parts, images, 0, 4)
    again = ImageParts(out, {"lr": 1}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    assert again.pending() == [(4, 8), (8, 12)] and again.n_done == 1
    other = ImageParts(out, {"lr": 2}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    assert other.pending() == other.ranges and other.n_done == 0


def test_a_part_of_the_wrong_shape_is_refused_and_assembly_needs_every_part(tmp_path):
    _, images = world(8)
    parts = ImageParts(tmp_path / "s.zarr", {}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    with pytest.raises(PipelineError, match="features is float64"):
        parts.write(0, 1, np.array([1]), {"image_ids": np.zeros(1, np.int64), "features": np.zeros((1, 8)),
                                          "pairs": np.zeros((0, 2), np.int64)})  # fmt: skip
    write_part(parts, images, 0, 4)
    with pytest.raises(PipelineError, match="1 parts missing"):
        parts.assemble({}, kind="samples")
    assert not (tmp_path / "s.zarr").exists()


def test_only_rank_0_writes_the_stamp_and_the_other_ranks_check_it(tmp_path):
    _, images = world(8)
    out = tmp_path / "s.zarr"
    stamp = out.parent / f".{out.name}.parts" / "key.json"
    with pytest.raises(PipelineError, match="rank 0 recorded parts of another key"):  # rank 0 not there yet
        ImageParts(out, {"lr": 1}, COLUMNS, len(images), images_per_part=4, is_main=False)
    ImageParts(out, {"lr": 1}, COLUMNS, len(images), images_per_part=4)
    recorded = stamp.stat().st_mtime_ns, stamp.read_bytes()
    other = ImageParts(out, {"lr": 1}, COLUMNS, len(images), images_per_part=4, is_main=False)
    assert other.pending(1, 2) == [(4, 8)]
    ImageParts(out, {"lr": 1}, COLUMNS, len(images), images_per_part=4)  # the same key: the stamp is left alone
    assert (stamp.stat().st_mtime_ns, stamp.read_bytes()) == recorded
    with pytest.raises(PipelineError, match="another key"):
        ImageParts(out, {"lr": 2}, COLUMNS, len(images), images_per_part=4, is_main=False)


def test_an_emptied_stamp_starts_over_instead_of_failing(tmp_path):
    _, images = world(8)
    out = tmp_path / "s.zarr"
    parts = ImageParts(out, {}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    write_part(parts, images, 0, 4)
    (parts.work / "key.json").write_text("")  # a kill inside a plain write, as before the stamp was atomic
    again = ImageParts(out, {}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    assert again.n_done == 0 and json.loads((again.work / "key.json").read_text())["digest"] == again.digest


def test_the_parts_stay_after_assembly_until_removed(tmp_path):
    _, images = world(8)
    out = tmp_path / "s.zarr"
    parts = ImageParts(out, {}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    for start, stop in parts.pending():
        write_part(parts, images, start, stop)
    parts.assemble({}, kind="samples")
    again = ImageParts(out, {}, COLUMNS, len(images), images_per_part=4, index_columns=("pairs",))
    assert again.pending() == [] and out.exists()  # a kill after assembly keeps every part for the rerun
    again.remove()
    assert not again.work.exists()


SLOW_WRITER = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_parts import COLUMNS, world, write_part
from pipeline.stores.parts import ImageParts
_, images = world(40)
parts = ImageParts({out!r}, {{}}, COLUMNS, len(images), images_per_part=5, index_columns=("pairs",))
print("pending", len(parts.pending()), flush=True)
for start, stop in parts.pending():
    write_part(parts, images, start, stop)
    time.sleep({pause})
parts.assemble({{}}, kind="samples")
parts.remove()
"""


def run_writer(out: Path, pause: float) -> subprocess.Popen:
    code = SLOW_WRITER.format(root=str(ROOT), tests=str(Path(__file__).parent), out=str(out), pause=pause)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_killed_writer_resumes_from_its_last_part_and_gives_the_same_store(tmp_path):
    out = tmp_path / "killed" / "s.zarr"
    proc = run_writer(out, pause=0.5)
    work = out.parent / f".{out.name}.parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(work.glob("part-*"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len([p for p in work.glob("part-*") if (p / "done").is_file()])
    assert 3 <= done < 8 and not out.exists()
    rerun = run_writer(out, pause=0.0)
    stdout, _ = rerun.communicate(timeout=60)
    assert rerun.returncode == 0 and stdout.split()[:2] == ["pending", str(8 - done)]
    reference = tmp_path / "whole" / "s.zarr"
    assert run_writer(reference, pause=0.0).wait(timeout=60) == 0
    assert files(out) == files(reference)
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.zarr"]  # no temporary folder left behind
    assert os.listdir(reference.parent) == ["s.zarr"]
