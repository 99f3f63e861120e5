"""Zarr v3 stores: the artifact contracts of DESIGN.md, atomic writes and fingerprints.

A store is a directory written to a temporary sibling and renamed into place when complete, so a
killed stage never leaves a store that looks finished. The root group's attrs describe the store:
its `kind`, the params that made it, the split, counts, and a `fingerprint` (a hash of every array's
bytes) that downstream stores record to detect a mismatched input. Nothing in a store depends on the git
commit or the clock (dvc.lock records the code), so the same inputs and params give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import PipelineError

CHUNK_BYTES = 1 << 20  # about 1 MB per chunk along the first axis
MAX_SHARDS_PER_ARRAY = 32  # keeps a store at a few hundred files (DVC hashes each one)...
SHARD_BYTES = 1 << 27  # ...unless its shards would exceed 128 MB (arrays over 4 GB): a writer buffers one shard


def temporary_path(final: Path | str) -> Path:
    """The one temporary path of `final` (`.name.tmp` beside it): a killed run's leftover is found and reused."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp"


def clean_leftovers(final: Path | str) -> None:
    """Remove what a killed writer of `final` left behind: its temporary path, and an old copy mid-rename (put
    back in place when the kill came between the two renames of a folder, so the previous output is not lost)."""
    final = Path(final)
    old = final.parent / f".{final.name}.old"
    if old.exists() and not final.exists():
        old.rename(final)
    if final.parent.is_dir():
        for pattern in (f".{final.name}.tmp*", f".{final.name}.old*"):
            for leftover in final.parent.glob(pattern):
                _remove(leftover)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success replace `final` with it, on error remove it.

    Whatever was at `final` before stays untouched until the new output is complete. The temporary
    path does not depend on the process, so the leftovers of a killed run are removed by the next one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)
    tmp = temporary_path(final)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_file() and not final.is_dir():  # a file replaces a file in one step: no moment without either
        os.replace(tmp, final)
        return
    old = final.parent / f".{final.name}.old"  # a folder cannot: the old one is moved aside first
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _remove(old)


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary file beside it, then a rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes, read 1 MB at a time (first 16 hex digits)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def torch_bytes(obj: Any) -> bytes:
    """`torch.save` of `obj` into memory: the same object always gives the same bytes.

    Saved to a file, torch names the archive's inner folder after the file, so a temporary file name
    (random, or with the pid) would make every save of identical weights differ, and DVC re-run stages
    downstream of a model that did not change.
    """
    import torch  # here, not at the top: the store module is also used where torch is not needed

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON atomically, with sorted keys (byte-stable for equal content)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk so that a chunk holds about CHUNK_BYTES."""
    row_bytes = itemsize * math.prod(shape[1:]) if len(shape) > 1 else itemsize
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def _layout(shape: tuple[int, ...], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(chunks, shards)``: chunks of about CHUNK_BYTES; at most MAX_SHARDS_PER_ARRAY shards, each of at most
    SHARD_BYTES (more shards for arrays over 4 GB), so that writing or reading a whole shard takes bounded memory."""
    rows = chunk_rows(shape, itemsize)
    n = max(1, shape[0]) if shape else 1
    rows = min(rows, n)
    chunk_bytes = rows * itemsize * math.prod(shape[1:])
    chunks_per_shard = max(1, math.ceil(math.ceil(n / rows) / MAX_SHARDS_PER_ARRAY))
    chunks_per_shard = max(1, min(chunks_per_shard, SHARD_BYTES // max(1, chunk_bytes)))
    shard_rows = rows * chunks_per_shard
    rest = tuple(max(1, s) for s in shape[1:])
    return (rows, *rest), (shard_rows, *rest)


def _update_digest(h: Any, rows: np.ndarray) -> None:
    """Feed an array's bytes to a hash without copying a contiguous array."""
    rows = np.ascontiguousarray(rows)
    h.update(memoryview(rows.reshape(-1)).cast("B") if rows.size else b"")


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (what `ArrayWriter` computes row block by row block)."""
    array = np.asarray(array)
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    _update_digest(h, array)
    return h.hexdigest()


class ArrayWriter:
    """Rows of one array of a store, written in order: buffered to whole shards, hashed as they pass.

    The final shape is declared up front; `write(rows)` appends rows, `close()` checks the count and
    returns the array's digest (equal to `array_digest` of the whole array). Memory: one shard's rows.
    """

    def __init__(self, group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.name, self.shape, self.dtype = name, tuple(int(s) for s in shape), np.dtype(dtype)
        self._hash = hashlib.sha256()
        self._hash.update(f"{self.dtype.str}{self.shape}".encode())
        if not self.shape:
            chunks, shards = (), None
        else:
            chunks, shards = _layout(self.shape, self.dtype.itemsize)
        self._array = group.create_array(
            name, shape=self.shape, dtype=self.dtype, chunks=chunks, shards=shards, fill_value=0
        )
        self._block = shards[0] if shards else max(1, self.shape[0] if self.shape else 1)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._written = 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.dtype != self.dtype or rows.shape[1:] != self.shape[1:]:
            raise PipelineError(
                f"store array {self.name!r}: rows of {rows.dtype} {rows.shape[1:]} do not fit {self.dtype} {self.shape}"
            )
        if self._written + self._n_pending + len(rows) > self.shape[0]:
            raise PipelineError(f"store array {self.name!r}: more than the {self.shape[0]} rows declared")
        self._pending.append(rows)
        self._n_pending += len(rows)
        while self._n_pending >= self._block:
            self._flush(self._block)

    def _flush(self, n: int) -> None:
        buffer = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, rest = buffer[:n], buffer[n:]
        self._array[self._written : self._written + n] = head
        _update_digest(self._hash, head)
        self._written += n
        self._pending = [rest] if len(rest) else []
        self._n_pending = len(rest)

    def close(self) -> str:
        if not self.shape:  # a scalar array
            value = np.concatenate(self._pending).reshape(()) if self._pending else np.zeros((), self.dtype)
            self._array[...] = value
            _update_digest(self._hash, value)
            return self._hash.hexdigest()
        if self._n_pending:
            self._flush(self._n_pending)
        if self._written != self.shape[0]:
            raise PipelineError(f"store array {self.name!r}: {self._written} rows written of {self.shape[0]} declared")
        return self._hash.hexdigest()


class StoreWriter:
    """A Zarr v3 store written array by array (each streamed by rows), then finished with its attrs.

    The fingerprint (sha256 over the sorted array names and each array's digest, first 16 hex digits)
    is the same as `write_store` computes from in-memory arrays. Write into a temporary path (see
    `atomic_path`); nothing in the store depends on the commit or the clock.
    """

    def __init__(self, path: Path | str) -> None:
        self.root = zarr.open_group(str(path), mode="w", zarr_format=3)
        self.digests: dict[str, str] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> ArrayWriter:
        return ArrayWriter(self.root, name, shape, np.dtype(dtype))

    def write_array(self, name: str, value: np.ndarray, block_rows: int | None = None) -> None:
        """A whole (or memory-mapped) array, written `block_rows` at a time."""
        value = np.asarray(value) if not hasattr(value, "shape") else value
        writer = self.array(name, tuple(value.shape), value.dtype)
        if not value.shape:
            writer.write(np.asarray(value).reshape(1))
        else:
            step = block_rows or max(1, writer._block)
            for start in range(0, value.shape[0], step):
                writer.write(np.asarray(value[start : start + step]))
        self.close(writer)

    def close(self, writer: ArrayWriter) -> None:
        self.digests[writer.name] = writer.close()

    def finish(self, attrs: Mapping[str, Any], kind: str) -> str:
        """Write the root attrs (kind, fingerprint, `attrs`); returns the fingerprint."""
        digest = hashlib.sha256()
        for name in sorted(self.digests):
            digest.update(name.encode())
            digest.update(self.digests[name].encode())
        fingerprint = digest.hexdigest()[:16]
        full_attrs = {"kind": kind, "fingerprint": fingerprint, **attrs}
        self.root.attrs.update(json.loads(json.dumps(full_attrs)))
        return fingerprint


def write_store(path: Path | str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any], kind: str) -> str:
    """Write `arrays` (names may contain '/' for groups) and `attrs` as a Zarr v3 store, atomically.

    Returns the store's fingerprint, also saved in its attrs. For arrays too large for memory, use
    `StoreWriter` (or `ImageParts`) and write rows as they are made.
    """
    with atomic_path(path) as tmp:
        writer = StoreWriter(tmp)
        for name, value in arrays.items():
            writer.write_array(name, np.asarray(value))
        return writer.finish(attrs, kind)


def open_store(path: Path | str, kind: str) -> zarr.Group:
    """Open a finished store for reading; a clear error if it is missing or of another kind."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise PipelineError(f"{path}: no Zarr store here (run the stage that writes it first)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises many types for a damaged store
        raise PipelineError(f"{path}: not a readable Zarr store ({type(err).__name__}: {err})") from None
    found = group.attrs.get("kind")
    if found != kind:
        raise PipelineError(f"{path}: expected a {kind!r} store, found {found!r}")
    return group


def store_array(group: zarr.Group, name: str) -> zarr.Array:
    """An array of a store, to be read by slices; a clear error naming the store if it is absent."""
    try:
        return group[name]
    except KeyError:
        raise PipelineError(f"{group.store}: array {name!r} is missing from this store") from None


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """A whole array of a store as numpy (for arrays of one row per image, or small stores)."""
    return np.asarray(store_array(group, name)[...])


def check_source(group: zarr.Group, source: zarr.Group, path: Path | str, source_path: Path | str) -> None:
    """Raise if `group` records a source fingerprint that differs from `source`'s own."""
    recorded = group.attrs.get("source_fingerprint")
    actual = source.attrs.get("fingerprint")
    if recorded != actual:
        raise PipelineError(
            f"{path}: made from a different {source_path} (fingerprint {recorded}, found {actual}); re-run its stage"
        )


def ragged_rows(offsets: np.ndarray, i: int) -> slice:
    """Rows of image i in a flat ragged array."""
    return slice(int(offsets[i]), int(offsets[i + 1]))


def offsets_from_counts(counts: list[int] | np.ndarray) -> np.ndarray:
    """image_offsets (n_images + 1, int64) from per-image row counts."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
