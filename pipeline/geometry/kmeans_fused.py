"""The CPU search's fused GEMM + top-2, float32 and float64 (fused_top2.c, built by setup.py, loaded with ctypes).

For small dimensions (``d + 2 <= MAX_TERMS``) the GEMM of kmeans_assign is cheap next to writing its (rows, K)
tile and reading it twice for the argmin and the second minimum: the kernel keeps each row's smallest two entries
in vector registers as it computes them (as faiss' fused k = 1 kernel keeps one), about faiss' k = 1 speed at d
= 16. Its entries are the same n-term dot products (multiply-adds, fused or not, in its own order), so they are
lower bounds under the same rounding bound, and the certificate decides the assignment exactly as before: the
kernel changes the time, never the result. Above ``MAX_TERMS`` numpy's GEMM (BLAS) is as fast, and the rows the
certificate leaves open need its tile anyway.

`width` says which instance runs (512: AVX-512, 256: AVX2 + FMA, 128: portable C; 0: none, when kmeans_assign runs
numpy's GEMM): none when setup.py could not build the kernel (no C compiler), when the build does not load, or
when it was built from other sources than the fused_top2.c / fused_top2_kernel.h next to this file (edited since
the last ``make setup``: rebuild).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import logging
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_TERMS = 66  # the kernel runs for d + 2 <= 66 (d <= 64): 1.35x numpy at 67 terms, 1.03x at 131
_LIBRARY = "_fused_top2"  # setup.py's Extension pipeline.geometry._fused_top2
_SOURCES = ("fused_top2.c", "fused_top2_kernel.h")  # setup.py's sources and depends, hashed into the build
_COLUMNS = 32  # the padded base's columns are a multiple of this (every instance reads whole blocks)
_MAX_COLUMNS = 2**31 - 64  # float32's lanes hold a column in an int32


def source_hash(folder: Path) -> str | None:
    """The first 16 hex digits of the sha256 of the kernel's sources in ``folder``, in `_SOURCES` order, as setup.py
    compiles it in; None when they are not there (an installed wheel need not ship them)."""
    paths = [folder / name for name in _SOURCES]
    if not all(path.is_file() for path in paths):
        return None
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@cache
def _library(folder: Path | None = None) -> ctypes.CDLL | None:
    """The kernel built next to this file (or in ``folder``), or None (see the module doc), with a warning where
    a build is there but cannot be used."""
    folder = Path(__file__).parent if folder is None else folder
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"{_LIBRARY}{suffix}"
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            built_from = ctypes.c_char_p.in_dll(lib, "fused_top2_source").value.decode()
            longs, i64 = np.ctypeslib.ndpointer(np.int64, flags="C"), ctypes.c_int64
            for fn, real in ((lib.fused_top2_f32, np.float32), (lib.fused_top2_f64, np.float64)):
                reals = np.ctypeslib.ndpointer(real, flags="C")
                fn.argtypes = [ctypes.c_int, reals, i64, i64, reals, i64, i64, longs, reals]
                fn.restype = None
            lib.fused_top2_width.restype = ctypes.c_int
        except (OSError, AttributeError, ValueError) as error:  # another machine's, Python's or version's build
            log.warning("the fused top-2 kernel %s does not load (%s): k-means runs numpy's GEMM", path, error)
            return None
        expected = source_hash(folder)
        if expected is not None and built_from != expected:
            log.warning(
                "the fused top-2 kernel %s was built from other sources than %s (make setup rebuilds it): k-means "
                "runs numpy's GEMM",
                path,
                " and ".join(_SOURCES),
            )
            return None
        return lib
    return None


@cache
def width() -> int:
    """The widest instance this CPU runs, in bits a vector (512, 256, 128), or 0 when the kernel is not built."""
    lib = _library()
    return int(lib.fused_top2_width()) if lib is not None else 0


def pad(base: np.ndarray) -> np.ndarray:
    """``base`` (n, K), float32 or float64, as the kernel reads it: its columns padded with zeros to a multiple of
    32."""
    n, k = base.shape
    out = np.zeros((n, -(-k // _COLUMNS) * _COLUMNS), dtype=base.dtype)
    out[:, :k] = base
    return out


def top2(xa: np.ndarray, padded: np.ndarray, k: int, bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``xa`` (b, n) the column of its smallest entry of ``xa @ base`` (ties: the lowest) and the
    smallest of its other entries (float64), ``base`` being the first ``k`` columns of ``padded`` (`pad`), computed
    in ``padded``'s precision (float32 or float64): what kmeans_tiles' `_top2` gets from numpy's tile. ``xa``'s
    last column must be 1, as in kmeans_terms' ``x''``: the kernel starts each sum from ``base``'s last row instead
    of multiplying by it. ``bits``: the instance (default `width`; tests run each)."""
    lib = _library()
    bits = width() if bits is None else bits
    if lib is None or not 0 < bits <= width():
        raise RuntimeError(f"the fused top-2 kernel cannot run the {bits}-bit instance (built: {width()} bits)")
    if padded.dtype not in (np.float32, np.float64):
        raise ValueError(f"base of dtype {padded.dtype}: float32 or float64")
    xa = np.ascontiguousarray(xa, dtype=padded.dtype)
    b, n = xa.shape
    if not n or padded.shape[0] != n or padded.shape[1] % _COLUMNS or not 0 < k <= min(padded.shape[1], _MAX_COLUMNS):
        raise ValueError(f"base of shape {padded.shape} for {n} terms and {k} columns")
    if not (xa[:, -1] == 1).all():
        raise ValueError("the rows' last term must be 1 (kmeans_terms' x''): the kernel does not read it")
    j1, second = np.empty(b, dtype=np.int64), np.empty(b, dtype=padded.dtype)
    if b:
        fn = lib.fused_top2_f32 if padded.dtype == np.float32 else lib.fused_top2_f64
        fn(bits, xa, b, n, padded, k, padded.shape[1], j1, second)
    return j1, second.astype(np.float64, copy=False)
