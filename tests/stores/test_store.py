from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import PipelineError
from pipeline.geometry.masks import encode_rle, mask_iou
from pipeline.geometry.paste import paste_masks
from pipeline.stores.store import (
    atomic_path,
    check_source,
    clean_leftovers,
    offsets_from_counts,
    open_store,
    read_array,
    write_store,
)


def ragged(rng, counts):
    n = sum(counts)
    return {
        "image_ids": np.arange(len(counts), dtype=np.int64) + 100,
        "image_hw": np.tile([[64, 48]], (len(counts), 1)).astype(np.int64),
        "image_offsets": offsets_from_counts(counts),
        "boxes": rng.uniform(0, 40, size=(n, 4)).astype(np.float32),
        "scores": rng.uniform(size=n).astype(np.float32),
        "masks": rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
    }


def test_ragged_round_trip_keeps_empty_images(tmp_path):
    rng = np.random.default_rng(0)
    counts = [3, 0, 5, 0, 1]
    arrays = ragged(rng, counts)
    fp = write_store(tmp_path / "p.zarr", arrays, {"split": "val", "counts": {"proposals": 9}}, kind="proposals")
    group = open_store(tmp_path / "p.zarr", "proposals")
    assert group.attrs["fingerprint"] == fp and group.attrs["split"] == "val"
    for name, value in arrays.items():
        back = read_array(group, name)
        assert back.dtype == value.dtype and np.array_equal(back, value)
    offsets = read_array(group, "image_offsets")
    assert np.diff(offsets).tolist() == counts
    assert read_array(group, "boxes")[offsets[2] : offsets[3]].shape == (5, 4)


def test_fingerprint_depends_on_content(tmp_path):
    rng = np.random.default_rng(0)
    a = ragged(rng, [2, 2])
    fp1 = write_store(tmp_path / "a.zarr", a, {}, kind="proposals")
    a["scores"][0] += 1
    fp2 = write_store(tmp_path / "b.zarr", a, {}, kind="proposals")
    assert fp1 != fp2


def test_large_arrays_are_chunked_and_sharded(tmp_path):
    masks = np.zeros((20_000, 28, 28), np.uint8)
    write_store(tmp_path / "m.zarr", {"masks": masks}, {}, kind="proposals")
    array = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")["masks"]
    chunk_bytes = np.prod(array.chunks) * array.dtype.itemsize
    assert 0.5e6 < chunk_bytes <= 1 << 20
    n_files = sum(1 for p in (tmp_path / "m.zarr").rglob("*") if p.is_file())
    assert n_files < 100


def test_atomic_path_keeps_old_output_on_failure(tmp_path):
    target = tmp_path / "out.zarr"
    write_store(target, {"x": np.arange(3)}, {}, kind="proposals")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "partial").write_text("half")
        raise RuntimeError("killed")
    assert np.array_equal(read_array(open_store(target, "proposals"), "x"), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_atomic_path_replaces_a_file_in_one_step(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    renames = []
    monkeypatch.setattr(Path, "rename", lambda self, to: renames.append((self, to)))  # a folder's two renames
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and renames == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_a_kill_between_a_folders_two_renames_puts_the_old_one_back(tmp_path):
    target = tmp_path / "out.zarr"
    write_store(target, {"x": np.arange(3)}, {}, kind="proposals")
    target.rename(tmp_path / ".out.zarr.old")  # the first rename done, then killed
    (tmp_path / ".out.zarr.tmp").mkdir()  # the new folder that was never renamed in
    clean_leftovers(target)
    assert np.array_equal(read_array(open_store(target, "proposals"), "x"), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_open_store_errors(tmp_path):
    with pytest.raises(PipelineError, match="no Zarr store here"):
        open_store(tmp_path / "missing.zarr", "proposals")
    write_store(tmp_path / "s.zarr", {"x": np.arange(3)}, {}, kind="samples")
    with pytest.raises(PipelineError, match="expected a 'proposals' store, found 'samples'"):
        open_store(tmp_path / "s.zarr", "proposals")


def test_check_source_mismatch(tmp_path):
    write_store(tmp_path / "p.zarr", {"x": np.arange(3)}, {}, kind="proposals")
    write_store(tmp_path / "s.zarr", {"y": np.arange(2)}, {"source_fingerprint": "0000"}, kind="samples")
    with pytest.raises(PipelineError, match="made from a different"):
        check_source(
            open_store(tmp_path / "s.zarr", "samples"), open_store(tmp_path / "p.zarr", "proposals"), "s.zarr", "p.zarr"
        )


def test_paste_full_box_mask_fills_box():
    masks = np.full((1, 28, 28), 255, np.uint8)
    pasted = paste_masks(masks, np.array([[10, 20, 30, 40]], np.float32), (64, 64))
    assert pasted.shape == (1, 64, 64)
    ys, xs = np.nonzero(pasted[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 20, 39)


def test_paste_is_deterministic_and_thresholded():
    rng = np.random.default_rng(1)
    probs = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    boxes = np.array([[0, 0, 20, 20], [5, 5, 50, 30], [-5, -5, 10, 10], [40, 40, 70, 70]], np.float32)
    a = paste_masks(probs, boxes, (64, 64))
    b = paste_masks(probs, boxes, (64, 64))
    assert a.dtype == bool and np.array_equal(a, b)
    assert not a[0, 30:, :].any()  # nothing outside its box
    assert paste_masks(probs[:0], boxes[:0], (64, 64)).shape == (0, 64, 64)


def test_rle_and_iou():
    a = np.zeros((2, 10, 10), bool)
    a[0, :5] = True
    a[1, :, :5] = True
    iou = mask_iou(a, a)
    assert np.allclose(np.diag(iou), 1) and np.isclose(iou[0, 1], 25 / 75)
    rle = encode_rle(a[0])
    assert isinstance(rle["counts"], str) and rle["size"] == [10, 10]


def _file_digests(path):
    import hashlib

    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _reference_store(path, arrays):
    """What zarr writes from whole in-memory arrays, with the store's chunk/shard layout (the pre-streaming writer)."""
    from pipeline.stores.store import _layout

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, value in arrays.items():
        chunks, shards = _layout(value.shape, value.dtype.itemsize)
        root.create_array(name, data=value, chunks=chunks, shards=shards)


def test_shards_are_at_most_32_per_array_and_128_mb_each():
    """A writer buffers one shard and zarr reads a whole shard when a selection needs all its chunks, so a shard's
    size is bounded; up to 4 GB an array keeps the layout it always had (at most 32 shards)."""
    import math

    from pipeline.stores.store import MAX_SHARDS_PER_ARRAY, SHARD_BYTES, _layout

    for shape, itemsize in [((400_000, 256), 4), ((2_400_000, 512), 2), ((2_400_000, 2048), 2), ((10**9,), 8)]:
        chunks, shards = _layout(shape, itemsize)
        row_bytes = itemsize * math.prod(shape[1:])
        n_shards = math.ceil(shape[0] / shards[0])
        assert shards[0] % chunks[0] == 0 and shards[0] * row_bytes <= SHARD_BYTES
        if shape[0] * row_bytes <= MAX_SHARDS_PER_ARRAY * SHARD_BYTES:
            assert n_shards <= MAX_SHARDS_PER_ARRAY
        assert n_shards * shards[0] * row_bytes < shape[0] * row_bytes + SHARD_BYTES  # no more shards than needed
    assert math.ceil(2_400_000 / _layout((2_400_000, 2048), 2)[1][0]) == 74  # LVIS train, resnet50 float16: 9.8 GB


@pytest.mark.parametrize("block_rows", [1, 7, 1000, 100_000])
def test_streamed_arrays_are_the_bytes_of_whole_arrays(tmp_path, block_rows):
    from pipeline.stores.store import StoreWriter, array_digest

    rng = np.random.default_rng(1)
    arrays = ragged(rng, list(rng.integers(0, 20, size=300)))
    _reference_store(tmp_path / "ref.zarr", arrays)
    writer = StoreWriter(tmp_path / "s.zarr")
    for name, value in arrays.items():
        writer.write_array(name, value, block_rows=block_rows)
    fingerprint = writer.finish({}, kind="proposals")
    ref, streamed = _file_digests(tmp_path / "ref.zarr"), _file_digests(tmp_path / "s.zarr")
    assert {k: v for k, v in ref.items() if k != "zarr.json"} == {k: v for k, v in streamed.items() if k != "zarr.json"}
    assert fingerprint == write_store(tmp_path / "w.zarr", arrays, {}, kind="proposals")
    assert writer.digests["masks"] == array_digest(arrays["masks"])


def test_store_attrs_do_not_depend_on_the_commit(tmp_path):
    write_store(tmp_path / "a.zarr", {"x": np.arange(3)}, {"split": "val"}, kind="proposals")
    attrs = dict(open_store(tmp_path / "a.zarr", "proposals").attrs)
    assert set(attrs) == {"kind", "fingerprint", "split"}


def test_array_writer_refuses_wrong_rows(tmp_path):
    from pipeline.stores.store import StoreWriter

    writer = StoreWriter(tmp_path / "s.zarr")
    array = writer.array("x", (4, 2), np.float32)
    with pytest.raises(PipelineError, match="do not fit"):
        array.write(np.zeros((1, 3), np.float32))
    array.write(np.zeros((3, 2), np.float32))
    with pytest.raises(PipelineError, match="3 rows written of 4"):
        array.close()


def test_a_killed_writers_leftovers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.zarr"
    (tmp_path / ".out.zarr.tmp").mkdir()
    (tmp_path / ".out.zarr.tmp-12345").mkdir()  # the per-process name of earlier versions
    write_store(target, {"x": np.arange(3)}, {}, kind="proposals")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
