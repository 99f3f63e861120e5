"""Zarr v3 stores: the artifact contracts of DESIGN.md, atomic writes and fingerprints.

A store is a directory written to a temporary sibling and renamed into place when complete, so a
killed stage never leaves a store that looks finished. The root group's attrs describe the store:
its `kind`, the params and code version that made it, the split, counts, and a `fingerprint` (a hash
of every array's bytes) that downstream stores record to detect a mismatched input.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import PipelineError

CHUNK_BYTES = 1 << 20  # about 1 MB per chunk along the first axis
MAX_SHARDS_PER_ARRAY = 32  # keeps a store at a few hundred files (DVC hashes each one)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success replace `final` with it, on error remove it.

    Whatever was at `final` before stays untouched until the new output is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _remove(old)


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary file beside it, then a rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
    rows = chunk_rows(shape, itemsize)
    n = max(1, shape[0]) if shape else 1
    rows = min(rows, n)
    chunks_per_shard = max(1, math.ceil(math.ceil(n / rows) / MAX_SHARDS_PER_ARRAY))
    shard_rows = rows * chunks_per_shard
    rest = tuple(max(1, s) for s in shape[1:])
    return (rows, *rest), (shard_rows, *rest)


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def code_version() -> str:
    """The git commit of the code that ran (with '-dirty' for uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline", "stages"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


def write_store(path: Path | str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any], kind: str) -> str:
    """Write `arrays` (names may contain '/' for groups) and `attrs` as a Zarr v3 store, atomically.

    Returns the store's fingerprint, also saved in its attrs.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(array_digest(np.asarray(arrays[name])).encode())
    fingerprint = digest.hexdigest()[:16]
    full_attrs = {"kind": kind, "code_version": code_version(), "fingerprint": fingerprint, **attrs}
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for name, value in arrays.items():
            value = np.asarray(value)
            chunks, shards = _layout(value.shape, value.dtype.itemsize)
            if not value.shape:
                chunks, shards = (), None
            root.create_array(name, data=value, chunks=chunks, shards=shards)
        root.attrs.update(json.loads(json.dumps(full_attrs)))
    return fingerprint


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


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """A whole array of a store as numpy; a clear error naming the store if it is absent."""
    try:
        return np.asarray(group[name][...])
    except KeyError:
        raise PipelineError(f"{group.store}: array {name!r} is missing from this store") from None


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
