"""Blocks of the samples store for embedding training: bounds, contents, pairs, the memory bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models import embedding_data
from pipeline.models.embedding import EmbeddingHead
from pipeline.models.embedding_data import (
    BLOCK_BYTES,
    SampleBlocks,
    block_bounds,
    block_loader,
    block_order,
    block_plan,
    default_block_rows,
)
from pipeline.models.embedding_train import train_embedder
from pipeline.stores.store import open_store, write_store

torch.set_num_threads(1)


def ragged_world(n_images=40, d=6, seed=0, dtype="float32"):
    """Images of 0..12 proposals; box[:, 0] is the row's index (to trace rows); pairs within images, in image order."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 13, n_images)
    counts[3] = 0
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    box = rng.normal(size=(n, d)).astype(dtype)
    box[:, 0] = np.arange(n)
    features = {"box": box, "fg": (box + 0.1).astype(dtype), "bg": (box - 0.1).astype(dtype)}
    obj, hier = [], []
    for i, k in enumerate(counts):
        for _ in range(int(k) // 2):
            a, b = rng.choice(int(k), 2, replace=False)
            obj.append((offsets[i] + a, offsets[i] + b))
            hier.append((offsets[i] + b, offsets[i] + a))
    return features, offsets, np.array(obj, np.int64), np.array(hier, np.int64)


def write_samples(path, data, dtype="float32"):
    features, offsets, obj, hier = data
    arrays = {f"features/{k}": v.astype(dtype) for k, v in features.items()}
    arrays.update({"image_offsets": offsets, "pairs/object": obj, "pairs/hier": hier})
    write_store(path, arrays, {}, "samples")
    return open_store(path, "samples")


def store_inputs(group):
    return (
        {k: group[f"features/{k}"] for k in ("box", "fg", "bg")},
        group["image_offsets"][...],
        group["pairs/object"],
        group["pairs/hier"],
    )


# --------------------------------------------------------------------------------------------- bounds


def test_block_bounds_are_whole_images_within_the_limit():
    offsets = np.array([0, 3, 3, 9, 10, 30, 31, 33, 40], dtype=np.int64)
    bounds = block_bounds(offsets, 8)
    assert bounds[0] == 0 and bounds[-1] == 40
    assert set(bounds.tolist()) <= set(offsets.tolist())  # every bound is an image boundary
    sizes = np.diff(bounds)
    assert (sizes > 0).all()
    assert bounds.tolist() == [0, 3, 10, 30, 33, 40]  # 10:30 is one image over the limit, alone
    assert block_bounds(offsets, 40).tolist() == [0, 40]  # N <= block_rows: a single block
    assert block_bounds(offsets, 1000).tolist() == [0, 40]


def test_block_bounds_end_at_chunk_boundaries_when_images_allow():
    offsets = np.arange(0, 101, 5, dtype=np.int64)  # 20 images of 5 rows
    # 32 rows at most, chunks of 10 rows: blocks end on 30, 60, 90 (chunk and image boundaries)
    assert block_bounds(offsets, 32, chunk_rows=10).tolist() == [0, 30, 60, 90, 100]
    assert block_bounds(offsets, 32).tolist() == [0, 30, 60, 90, 100]
    offsets = np.array([0, 7, 14, 21, 28], dtype=np.int64)  # no image ends on a chunk boundary of 10
    assert block_bounds(offsets, 12, chunk_rows=10).tolist() == [0, 7, 14, 21, 28]


def test_default_block_rows_bounds_memory_whatever_n():
    for dim, itemsize in ((512, 2), (512, 4), (2048, 4)):
        row_bytes = 3 * dim * itemsize
        chunk = (1 << 20) // (dim * itemsize)
        rows = default_block_rows(row_bytes, chunk)
        assert rows * row_bytes <= BLOCK_BYTES and rows % chunk == 0 and rows >= chunk
    assert default_block_rows(10**9) == 1
    # the embedded world (about 3,600 train proposals x 512 float32 x 3 views) is one block
    assert default_block_rows(3 * 512 * 4, 512) >= 3600


def test_block_order_is_seeded_per_epoch_and_single_block_draws_nothing():
    a, b = block_order(0, 0, 7), block_order(0, 1, 7)
    assert sorted(a.tolist()) == list(range(7)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, block_order(0, 0, 7))
    assert not np.array_equal(a, block_order(1, 0, 7))
    assert block_order(5, 3, 1).tolist() == [0]
    plan = block_plan(3, 0, 2, start=(0, 2))
    assert [(e, j) for e, j, _ in plan] == [(0, 2), (1, 0), (1, 1), (1, 2)]
    assert [b for e, _, b in plan if e == 1] == block_order(0, 1, 3).tolist()


# ---------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("num_workers", [0, 2])
def test_blocks_hold_every_row_once_with_their_pairs(tmp_path, num_workers):
    data = ragged_world()
    group = write_samples(tmp_path / "samples.zarr", data, "float16")
    features, offsets, obj, hier = data
    blocks = SampleBlocks(*store_inputs(group), block_rows=25)
    assert len(blocks) > 3
    order = block_order(0, 0, len(blocks))
    seen, got_obj, got_hier = [], [], []
    for block, b in zip(block_loader(blocks, order, num_workers), order, strict=True):
        assert block.index == b and block.start == blocks.bounds[b] and block.rows <= 25
        rows = block.views["box"][:, 0].float().numpy().astype(np.int64)
        np.testing.assert_array_equal(rows, block.start + np.arange(block.rows))
        assert block.views["fg"].dtype == torch.float16  # the store's dtype; float32 per batch only
        # block-local image offsets: whole images of the split
        assert block.offsets[0] == 0 and block.offsets[-1] == block.rows
        assert set((block.offsets + block.start).tolist()) <= set(offsets.tolist())
        image = np.searchsorted(block.offsets, block.object_pairs, side="right") - 1
        assert (image[:, 0] == image[:, 1]).all()  # a pair lies within one image of the block
        seen.append(rows)
        got_obj.append(block.object_pairs + block.start)
        got_hier.append(block.hier_pairs + block.start)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(int(offsets[-1])))
    key = lambda p: sorted(map(tuple, np.concatenate(p).tolist()))  # noqa: E731
    assert key(got_obj) == sorted(map(tuple, obj.tolist())) and key(got_hier) == sorted(map(tuple, hier.tolist()))


def test_training_visits_every_proposal_once_per_epoch_within_a_block(tmp_path, monkeypatch):
    data = ragged_world(seed=1)
    features, offsets, _, _ = data
    n = int(offsets[-1])
    group = write_samples(tmp_path / "samples.zarr", data)
    seen = []
    real_forward = EmbeddingHead.forward

    def spy(head, x):
        seen.append(x[: len(x) // 3, 0].round().long().tolist())  # mask term only: box, fg, bg rows
        return real_forward(head, x)

    monkeypatch.setattr(EmbeddingHead, "forward", spy)
    feats, offs, _, _ = store_inputs(group)
    _, history = train_embedder(
        feats, offs, None, None, hidden=8, dim=4, weights={"mask": 1.0, "object": 0.0, "hier": 0.0},
        epochs=2, batch_size=4, block_rows=20, progress=False,
    )  # fmt: skip
    bounds = block_bounds(offs, 20)
    steps = sum(-(-int(s) // 4) for s in np.diff(bounds))
    assert len(seen) == 2 * steps
    for epoch in range(2):
        rows = np.concatenate(seen[epoch * steps : (epoch + 1) * steps])
        np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    for batch in seen:  # every batch comes from one block
        assert len(set(np.searchsorted(bounds, batch, side="right") - 1)) == 1
    assert [h["triplets"] for h in history] == [n, n]


def test_pairs_out_of_block_order_are_kept_in_memory_sorted_by_block():
    features, offsets, obj, hier = ragged_world()
    shuffled = obj[np.random.default_rng(0).permutation(len(obj))]
    blocks = SampleBlocks(features, offsets, shuffled, hier, block_rows=25)
    for b in range(len(blocks)):
        lo, hi = blocks.bounds[b], blocks.bounds[b + 1]
        inside = shuffled[(shuffled[:, 0] >= lo) & (shuffled[:, 0] < hi)]
        np.testing.assert_array_equal(blocks.object_pairs.get(b) + lo, inside)  # order within a block kept
    np.testing.assert_array_equal(blocks.object_pairs.take(np.array([0, 5, 6])), shuffled[[0, 5, 6]])


def test_pair_errors_are_one_line():
    features, offsets, obj, hier = ragged_world()
    with pytest.raises(PipelineError, match=r"object pairs must have shape \(P, 2\)"):
        SampleBlocks(features, offsets, obj[:, :1], hier)
    with pytest.raises(PipelineError, match="hier pairs index proposals outside"):
        SampleBlocks(features, offsets, obj, hier + 10_000)
    far = np.array([[0, int(offsets[-1]) - 1]])
    SampleBlocks(features, offsets, far, hier, block_rows=10_000)  # one block: any pair is fine
    with pytest.raises(PipelineError, match="joins two blocks"):
        SampleBlocks(features, offsets, far, hier, block_rows=25)


# ---------------------------------------------------------------------------------------------- memory


class CountingArray:
    """A read-only array that records the rows of every read (what a block reader may hold at once)."""

    def __init__(self, array, reads):
        self.array, self.reads = array, reads
        self.shape, self.dtype = array.shape, array.dtype
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(len(out))
        return out


def test_reads_never_exceed_block_rows(tmp_path, monkeypatch):
    data = ragged_world(n_images=80, seed=2)
    group = write_samples(tmp_path / "samples.zarr", data)
    feats, offs, obj, hier = store_inputs(group)
    feature_reads, pair_reads = [], []
    counted = {k: CountingArray(v, feature_reads) for k, v in feats.items()}
    monkeypatch.setattr(embedding_data, "PAIR_READ_ROWS", 16)
    for num_workers in (0, 2):
        feature_reads.clear()
        _, history = train_embedder(
            counted, offs, CountingArray(obj, pair_reads), CountingArray(hier, pair_reads),
            hidden=8, dim=4, weights={"mask": 1.0, "object": 1.0, "hier": 1.0}, epochs=2, batch_size=8,
            block_rows=30, num_workers=num_workers, progress=False,
        )  # fmt: skip
        if num_workers == 0:  # reads in worker processes are not seen here
            assert feature_reads and max(feature_reads) <= 30
        assert "d0_parent" in history[-1]  # the evaluation read the box view by slices too
    # pairs: indexed 16 at a time, then read block by block (a block of 30 rows holds fewer pairs)
    assert obj.shape[0] > 16 and max(pair_reads) <= 16
