"""Stores built from parts of whole images: streamed, resumable, and shardable across ranks.

A stage that makes rows per image (`propose`, `sample`) processes its split in parts of
`images_per_part` consecutive images. Each finished part is saved, as one `.npy` file per array, under
a work folder beside the final store (`data/val/.proposals.zarr.parts/part-00000000-00000256/`),
written to a temporary name and renamed, so a part on disk is always complete. When every part is
there, `assemble` streams them, in image order, into the final Zarr store (through
`pipeline.stores.store.StoreWriter`, one shard's rows in memory at a time); the stage removes the work folder
(`remove`) once its every output is written.

- Memory: one part while computing, one part plus one shard per array while assembling.
- Resume: a rerun after a kill finds the finished parts and computes only the missing ones. The work
  folder records a digest of what the parts were made from (params, input fingerprints); parts of
  another run are discarded, never mixed in. Only rank 0 writes that record (atomically); the other ranks,
  started after it (`pipeline.distributed.main_first`), check it.
- Ranks: parts are independent and named by their image range, so ranks can compute disjoint parts of
  one store; the assembled store is the same bytes whoever computed which part.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stores.checkpoint import key_digest
from pipeline.stores.store import StoreWriter, atomic_path, write_bytes

log = logging.getLogger(__name__)

IMAGES_PER_PART = 256  # images per part: the unit of work, of memory and of resume
OFFSETS = "image_offsets"


@dataclass(frozen=True)
class Column:
    """One array of the store: its dtype and the shape of one row (`per_image`: one row per image)."""

    dtype: str
    row_shape: tuple[int, ...] = ()
    per_image: bool = False


def part_ranges(n_images: int, images_per_part: int) -> list[tuple[int, int]]:
    """[start, stop) image ranges of the parts of a split of `n_images` images."""
    step = max(1, int(images_per_part))
    return [(start, min(start + step, n_images)) for start in range(0, n_images, step)]


class ImageParts:
    """The parts of one store under construction (see the module docstring).

    `columns` declares every array; a part must hold each one (zero rows allowed) plus `counts`, the
    number of rows of each of its images, from which `image_offsets` of the store is assembled.
    Arrays of pairs (row indices into the store) are given with part-local indices and shifted to
    global rows on assembly: name them in `index_columns`.
    """

    def __init__(
        self,
        final: Path | str,
        key: Mapping[str, Any],
        columns: Mapping[str, Column],
        n_images: int,
        *,
        images_per_part: int = IMAGES_PER_PART,
        index_columns: tuple[str, ...] = (),
        is_main: bool = True,
    ) -> None:
        self.final = Path(final)
        self.work = self.final.parent / f".{self.final.name}.parts"
        self.columns = dict(columns)
        self.index_columns = index_columns
        self.n_images = int(n_images)
        self.ranges = part_ranges(self.n_images, images_per_part)
        self.digest = key_digest({**key, "images_per_part": int(images_per_part), "n_images": self.n_images})
        stamp = self.work / "key.json"
        if not is_main:  # rank 0 has set the folder up (`main_first`): the other ranks only check it
            if self._recorded(stamp) != self.digest:
                raise PipelineError(f"{stamp}: rank 0 recorded parts of another key (ranks with different params?)")
            return
        if self.work.exists() and self._recorded(stamp) != self.digest:
            log.info("%s: parts of another run (params or inputs changed); starting over", self.work)
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        if self._recorded(stamp) != self.digest:
            write_bytes(
                stamp, (json.dumps({"digest": self.digest, "key": key}, sort_keys=True, default=str) + "\n").encode()
            )

    @staticmethod
    def _recorded(stamp: Path) -> str | None:
        """The digest a work folder's stamp records; None without one, or with an unreadable one (a stamp of
        before the atomic writes, emptied by a kill)."""
        try:
            return json.loads(stamp.read_text()).get("digest")
        except (OSError, ValueError, AttributeError):
            return None

    def _folder(self, start: int, stop: int) -> Path:
        return self.work / f"part-{start:08d}-{stop:08d}"

    def done(self, start: int, stop: int) -> bool:
        return (self._folder(start, stop) / "done").is_file()

    def pending(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
        """Parts not yet on disk; with several ranks, this rank's share (every world_size-th part)."""
        return [r for i, r in enumerate(self.ranges) if i % world_size == rank and not self.done(*r)]

    @property
    def n_done(self) -> int:
        return sum(self.done(*r) for r in self.ranges)

    def write(
        self,
        start: int,
        stop: int,
        counts: np.ndarray,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Save the part of images [start, stop): `counts` rows per image, `arrays` as declared, and a
        small JSON-able `meta` (e.g. the ids of images it skipped), returned by `metas()`."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (stop - start,):
            raise PipelineError(f"part {start}:{stop}: {counts.shape[0]} row counts for {stop - start} images")
        if set(arrays) != set(self.columns):
            raise PipelineError(f"part {start}:{stop}: arrays {sorted(arrays)}, expected {sorted(self.columns)}")
        for name, column in self.columns.items():
            value = np.asarray(arrays[name])
            if value.dtype != np.dtype(column.dtype) or value.shape[1:] != column.row_shape:
                raise PipelineError(
                    f"part {start}:{stop}: {name} is {value.dtype} {value.shape[1:]}, "
                    f"declared {column.dtype} {column.row_shape}"
                )
            if name in self.index_columns:
                continue  # pairs: any number of rows
            expected = stop - start if column.per_image else int(counts.sum())
            if len(value) != expected:
                raise PipelineError(f"part {start}:{stop}: {name} has {len(value)} rows, expected {expected}")
        with atomic_path(self._folder(start, stop)) as tmp:
            tmp.mkdir()
            np.save(tmp / "counts.npy", counts)
            (tmp / "meta.json").write_text(json.dumps(meta or {}, sort_keys=True) + "\n")
            for name, value in arrays.items():
                np.save(tmp / f"{name.replace('/', '__')}.npy", np.ascontiguousarray(value))
            (tmp / "done").write_text("")

    def _load(self, start: int, stop: int, name: str) -> np.ndarray:
        return np.load(self._folder(start, stop) / f"{name.replace('/', '__')}.npy", mmap_mode="r")

    def metas(self) -> list[dict]:
        """The `meta` of every finished part, in image order."""
        return [json.loads((self._folder(*r) / "meta.json").read_text()) for r in self.ranges if self.done(*r)]

    def _counts(self) -> Iterator[np.ndarray]:
        for start, stop in self.ranges:
            yield np.load(self._folder(start, stop) / "counts.npy")

    def n_rows(self, name: str) -> int:
        """Rows of array `name` over all finished parts (e.g. the number of pairs)."""
        return sum(len(self._load(*r, name)) for r in self.ranges if self.done(*r))

    def row_counts(self) -> np.ndarray:
        """Rows per image over the whole split (n_images,), once every part is done."""
        return np.concatenate([np.zeros(0, np.int64), *self._counts()])

    def assemble(self, attrs: Mapping[str, Any], kind: str) -> str:
        """Stream every part into the final store (atomically); the fingerprint. The parts stay until `remove`,
        which a stage calls once every output of it is written (a kill before then loses no part)."""
        missing = [r for r in self.ranges if not self.done(*r)]
        if missing:
            raise PipelineError(
                f"{self.work}: {len(missing)} parts missing (first: images {missing[0][0]}:{missing[0][1]})"
            )
        counts = self.row_counts()
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        first_row = {r: int(offsets[r[0]]) for r in self.ranges}
        with atomic_path(self.final) as tmp:
            writer = StoreWriter(tmp)
            writer.write_array(OFFSETS, offsets)
            for name, column in self.columns.items():
                array = writer.array(name, (self.n_rows(name), *column.row_shape), column.dtype)
                for r in self.ranges:
                    rows = np.asarray(self._load(*r, name))
                    if name in self.index_columns:
                        rows = rows + np.asarray(first_row[r], dtype=rows.dtype)
                    array.write(rows)
                writer.close(array)
            return writer.finish(attrs, kind)

    def remove(self) -> None:
        """Remove the work folder: the parts are no longer needed once the stage's outputs are all written."""
        shutil.rmtree(self.work, ignore_errors=True)
