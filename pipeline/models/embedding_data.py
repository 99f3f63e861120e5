"""Training data of the embedding head, read from the samples store by blocks of whole images.

The three feature views of a split do not fit in memory at LVIS size (2 M proposals x 512 or 2048
dims x 3 views: 12 to 50 GB), so training reads them by *blocks*: consecutive whole images, at most
`block_rows` proposals (by default what `BLOCK_BYTES` of stored features hold, whatever N), ending
where the store's chunks end when an image boundary allows. Object and hier pairs lie within one
image, so a block holds all the pairs of its proposals; the pair arrays are indexed once, read chunk by
chunk, and each block reads only its own pair rows.

`SampleBlocks` is a map-style torch Dataset: item b is the `Block` b (its views as torch tensors in the
store's dtype, its image offsets and pairs, all block-local). `block_loader` serves blocks in a given
order through a DataLoader (`num_workers` processes read ahead, one block each); the training loop
shuffles within the block, gathers each batch's rows, converts them to float32 and sends only the batch
to the device. The order of blocks in an epoch, `block_order`, depends only on (seed, epoch), never on
the training generator, so workers reading ahead cannot change any random draw.

Memory: one block in the training loop plus one per worker, whatever the split's size; the pair index
is a few integers per block (pairs not stored block by block, which the samples store never does, are
kept in memory, sorted by block).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20  # stored feature bytes (all views read) per block, when block_rows is not given
PAIR_READ_ROWS = 1 << 20  # pairs per read while indexing the pair arrays (16 MB of int64)
_ORDER_SALT = 0x626C6F636B  # "block": keeps the block order's stream apart from other uses of the seed


def default_block_rows(row_bytes: int, chunk_rows: int = 1, budget: int | None = None) -> int:
    """Rows per block so that a block holds at most `budget` bytes (default `BLOCK_BYTES`), a whole number
    of chunks when possible."""
    rows = max(1, int(BLOCK_BYTES if budget is None else budget) // max(1, int(row_bytes)))
    if chunk_rows > 1 and rows >= chunk_rows:
        rows -= rows % chunk_rows
    return rows


def block_bounds(image_offsets: np.ndarray, block_rows: int, chunk_rows: int = 1) -> np.ndarray:
    """Row boundaries (n_blocks + 1, int64) of blocks of whole images, each at most `block_rows` rows.

    A block ends at the last image boundary at or before the last chunk boundary within `block_rows`
    (at or before `block_rows` when no image ends there); an image larger than `block_rows` is a block
    alone. With N <= block_rows the split is one block.
    """
    offsets = np.asarray(image_offsets, dtype=np.int64)
    n = int(offsets[-1])
    edges = np.unique(offsets)
    block_rows, chunk_rows = max(1, int(block_rows)), max(1, int(chunk_rows))

    def last_edge_at_most(row: int) -> int:
        return int(edges[np.searchsorted(edges, row, side="right") - 1])

    bounds, start = [0], 0
    while start < n:
        limit = start + block_rows
        if limit >= n:
            end = n
        else:
            end = last_edge_at_most(limit - limit % chunk_rows)
            if end <= start:
                end = last_edge_at_most(limit)
            if end <= start:  # one image over the limit
                end = int(edges[np.searchsorted(edges, start, side="right")])
        bounds.append(end)
        start = end
    return np.asarray(bounds, dtype=np.int64)


def block_order(seed: int, epoch: int, n_blocks: int) -> np.ndarray:
    """The seeded random order of the blocks in `epoch` ([0] for a single block: no draw at all)."""
    if n_blocks <= 1:
        return np.zeros(max(0, n_blocks), dtype=np.int64)
    rng = np.random.default_rng([int(seed) % (1 << 63), int(epoch), _ORDER_SALT])
    return rng.permutation(n_blocks).astype(np.int64)


def _rows_of(array: Any) -> int:
    return int(array.shape[0])


def _as_array_like(value: Any) -> Any:
    """Arrays (numpy, zarr, anything with shape and slicing) as they are; lists as int64 numpy."""
    if value is None:
        return np.zeros((0, 2), dtype=np.int64)
    return value if hasattr(value, "shape") and hasattr(value, "__getitem__") else np.asarray(value, dtype=np.int64)


class BlockPairs:
    """A (P, 2) pair array (rows of the split) split by blocks: `get(b)` reads block b's pairs, block-local.

    Checked while indexed (shape, rows in 0..N-1, both rows of a pair in one block). Pairs stored block
    by block (as the samples store writes them, image by image) are read from the source; others are
    kept in memory, sorted by block (stable: the order within a block is kept).
    """

    def __init__(self, name: str, pairs: Any, bounds: np.ndarray, read_rows: int | None = None) -> None:
        self.name, self.bounds = name, bounds
        read_rows = read_rows or PAIR_READ_ROWS
        n, n_blocks = int(bounds[-1]), len(bounds) - 1
        source = _as_array_like(pairs)
        shape = tuple(source.shape)
        self.count = 0 if math.prod(shape) == 0 else shape[0]
        self.source: Any = np.zeros((0, 2), dtype=np.int64)
        self.ranges = np.zeros(n_blocks + 1, dtype=np.int64)
        if self.count == 0:
            return
        if len(shape) != 2 or shape[1] != 2:
            raise PipelineError(f"embedding: {name} pairs must have shape (P, 2), got {shape}")
        counts = np.zeros(n_blocks, dtype=np.int64)
        in_order, last = True, 0
        for a in range(0, self.count, read_rows):
            part = np.asarray(source[a : a + read_rows], dtype=np.int64)
            if part.min() < 0 or part.max() >= n:
                raise PipelineError(f"embedding: {name} pairs index proposals outside 0..{n - 1}")
            block = np.searchsorted(bounds, part, side="right") - 1
            across = np.flatnonzero(block[:, 0] != block[:, 1])
            if across.size:
                i, j = part[across[0]]
                raise PipelineError(
                    f"embedding: {name} pair ({i}, {j}) joins two blocks of images; pairs must lie within one image"
                )
            block = block[:, 0]
            in_order &= bool(block[0] >= last and np.all(block[1:] >= block[:-1]))
            last = int(block[-1])
            counts += np.bincount(block, minlength=n_blocks)
        self.ranges[1:] = np.cumsum(counts)
        if in_order:
            self.source = source
            return
        log.info("embedding: %s pairs are not stored block by block; keeping them in memory, sorted", name)
        whole = np.asarray(source[:], dtype=np.int64)
        block = np.searchsorted(bounds, whole[:, 0], side="right") - 1
        self.source = whole[np.argsort(block, kind="stable")]
        self._original = whole

    def get(self, b: int) -> np.ndarray:
        """Block b's pairs, as rows of the block (int64, (P_b, 2))."""
        lo, hi = int(self.ranges[b]), int(self.ranges[b + 1])
        if lo == hi:
            return np.zeros((0, 2), dtype=np.int64)
        return np.asarray(self.source[lo:hi], dtype=np.int64) - self.bounds[b]

    def take(self, index: np.ndarray, read_rows: int | None = None) -> np.ndarray:
        """Pairs at the sorted positions `index` of the *original* array (rows of the split), read in windows."""
        read_rows = read_rows or PAIR_READ_ROWS
        source = getattr(self, "_original", self.source)
        index = np.asarray(index, dtype=np.int64)
        out = np.zeros((index.size, 2), dtype=np.int64)
        i = 0
        while i < index.size:
            lo = int(index[i])
            j = int(np.searchsorted(index, lo + read_rows, side="left"))
            window = np.asarray(source[lo : int(index[j - 1]) + 1], dtype=np.int64)
            out[i:j] = window[index[i:j] - lo]
            i = j
        return out


@dataclass
class Block:
    """Consecutive whole images of the split: rows [start, start + rows) and their pairs, block-local."""

    index: int
    start: int
    views: dict[str, Tensor]  # (rows, D) in the store's dtype, on the CPU
    offsets: np.ndarray  # image offsets within the block, from 0 to rows
    object_pairs: np.ndarray  # (P_b, 2) rows of the block
    hier_pairs: np.ndarray  # (Q_b, 2) rows of the block, parent first

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])


def _tensor(rows: Any) -> Tensor:
    array = np.asarray(rows)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")
    return torch.from_numpy(array)


class SampleBlocks(Dataset):
    """The training split as blocks of whole images (see the module docstring).

    `features` maps view names to (N, D) arrays sliceable along rows (zarr arrays of the samples store,
    or numpy); `image_offsets` (n_images + 1) is read whole; `object_pairs` (P, 2) and `hier_pairs`
    (Q, 2) are pair arrays of rows of the split (or None). `block_rows` None: `default_block_rows` of
    the views' stored row size and chunk rows.
    """

    def __init__(
        self,
        features: Mapping[str, Any],
        image_offsets: Any,
        object_pairs: Any,
        hier_pairs: Any,
        *,
        block_rows: int | None = None,
    ) -> None:
        self.features = {k: (v if hasattr(v, "shape") else np.asarray(v)) for k, v in features.items()}
        first = next(iter(self.features))
        shape = tuple(self.features[first].shape)
        for k, v in self.features.items():
            if len(v.shape) != 2 or tuple(v.shape) != shape:
                raise PipelineError(
                    f"embedding: features[{k!r}] has shape {tuple(v.shape)}, expected (N, D) like {first} {shape}"
                )
        n = shape[0]
        if n == 0:
            raise PipelineError("embedding: no proposals to train on (features are empty)")
        offsets = np.asarray(image_offsets[:] if hasattr(image_offsets, "shape") else image_offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise PipelineError(f"embedding: image_offsets must rise from 0 to N={n} (got {offsets.size} entries)")
        self.n, self.dim, self.offsets = int(n), int(shape[1]), offsets
        row_bytes = sum(self.dim * np.dtype(v.dtype).itemsize for v in self.features.values())
        chunks = getattr(self.features[first], "chunks", None)
        chunk_rows = int(chunks[0]) if chunks else 1
        self.block_rows = int(block_rows) if block_rows else default_block_rows(row_bytes, chunk_rows)
        if self.block_rows < 1:
            raise PipelineError(f"embedding: block_rows must be >= 1, got {block_rows}")
        self.bounds = block_bounds(offsets, self.block_rows, chunk_rows)
        self.object_pairs = BlockPairs("object", object_pairs, self.bounds)
        self.hier_pairs = BlockPairs("hier", hier_pairs, self.bounds)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def block_sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    def __getitem__(self, b: int) -> Block:
        b = int(b)
        lo, hi = int(self.bounds[b]), int(self.bounds[b + 1])
        local = self.offsets[(self.offsets >= lo) & (self.offsets <= hi)] - lo
        return Block(
            index=b,
            start=lo,
            views={k: _tensor(v[lo:hi]) for k, v in self.features.items()},
            offsets=local,
            object_pairs=self.object_pairs.get(b),
            hier_pairs=self.hier_pairs.get(b),
        )

    def read_rows(self, view: str, ids: np.ndarray) -> Tensor:
        """Rows `ids` (sorted, ascending) of one view, read by slices of at most `block_rows` rows."""
        source = self.features[view]
        parts, i = [], 0
        while i < ids.size:
            lo = int(ids[i])
            j = int(np.searchsorted(ids, lo + self.block_rows, side="left"))
            window = _tensor(source[lo : int(ids[j - 1]) + 1])
            parts.append(window[torch.from_numpy(np.asarray(ids[i:j] - lo, dtype=np.int64))])
            i = j
        return torch.cat(parts) if parts else torch.zeros((0, self.dim))


def _keep(block: Block) -> Block:
    return block


def block_loader(dataset: SampleBlocks, order: Iterable[int], num_workers: int = 0) -> DataLoader:
    """A DataLoader serving `dataset[b]` for b in `order`, read ahead by `num_workers` processes (one block each)."""
    order = list(int(b) for b in order)
    workers = max(0, int(num_workers))
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=order,
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=1 if workers else None,
        generator=torch.Generator().manual_seed(0),  # the loader's own seed draw leaves the global RNG alone
    )


def block_plan(n_blocks: int, seed: int, epochs: int, start: tuple[int, int] = (0, 0)) -> list[tuple[int, int, int]]:
    """(epoch, position, block) in training order from `start` = (epoch, position) to the last epoch."""
    plan = []
    for epoch in range(start[0], epochs):
        order = block_order(seed, epoch, n_blocks)
        first = start[1] if epoch == start[0] else 0
        plan += [(epoch, j, int(order[j])) for j in range(first, n_blocks)]
    return plan


def batch_sizes(rows: int, batch_size: int) -> Sequence[int]:
    """Sizes of the batches of a block of `rows` proposals (the last one may be smaller)."""
    return [min(batch_size, rows - s) for s in range(0, rows, batch_size)]
