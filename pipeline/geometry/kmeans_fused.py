"""The CPU search's fused float32 GEMM + top-2 (fused_top2.c, built by setup.py, loaded here with ctypes).

For small dimensions (``d + 3 <= MAX_TERMS``: d = 16, the paper's) the float32 GEMM of kmeans_assign is cheap
next to writing its (rows, K) tile and reading it twice for the argmin and the second minimum: the kernel keeps
each row's smallest two entries in vector registers as it computes them (as faiss' fused k = 1 kernel keeps
one), 2x numpy's GEMM + top-2 at d = 16 on one AVX-512 core. Its entries are the same n-term float32 dot products
(multiply-adds, fused or not, in its own order), so they are lower bounds under the same rounding bound, and the
certificate decides the assignment exactly as before: the kernel changes the time, never the result. Above
``MAX_TERMS`` numpy's GEMM (BLAS) is as fast and the rows the certificate leaves open need its tile anyway.

`width` says which instance runs (512: AVX-512, 256: AVX2 + FMA, 128: portable C; 0: not built, say without a C
compiler at install, when kmeans_assign runs numpy's GEMM).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_TERMS = 67  # the kernel runs for d + 3 <= 67 (d <= 64): 1.35x numpy at 67 terms, 1.03x at 131
_LIBRARY = "_fused_top2"  # setup.py's Extension pipeline.geometry._fused_top2
_COLUMNS = 32  # the padded base's columns are a multiple of this (every instance reads whole blocks)


@cache
def _library() -> ctypes.CDLL | None:
    """The built kernel next to this file, or None when it was not built."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{_LIBRARY}{suffix}"
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as error:  # built for another machine or Python: numpy's GEMM does the same work
                log.warning("the fused top-2 kernel %s does not load (%s): k-means runs numpy's GEMM", path, error)
                return None
            floats, longs = np.ctypeslib.ndpointer(np.float32, flags="C"), np.ctypeslib.ndpointer(np.int64, flags="C")
            i64 = ctypes.c_int64
            lib.fused_top2.argtypes = [ctypes.c_int, floats, i64, i64, floats, i64, i64, longs, floats]
            lib.fused_top2.restype = None
            lib.fused_top2_width.restype = ctypes.c_int
            return lib
    return None


@cache
def width() -> int:
    """The widest instance this CPU runs, in bits a vector (512, 256, 128), or 0 when the kernel is not built."""
    lib = _library()
    return int(lib.fused_top2_width()) if lib is not None else 0


def pad(base32: np.ndarray) -> np.ndarray:
    """``base32`` (n, K) float32 as the kernel reads it: its columns padded with zeros to a multiple of 32."""
    n, k = base32.shape
    out = np.zeros((n, -(-k // _COLUMNS) * _COLUMNS), dtype=np.float32)
    out[:, :k] = base32
    return out


def top2(xa: np.ndarray, padded: np.ndarray, k: int, bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``xa`` (b, n) float32 the column of its smallest entry of ``xa @ base`` (ties: the lowest) and
    the smallest of its other entries (float64), ``base`` being the first ``k`` columns of ``padded`` (`pad`): what
    kmeans_assign's `_top2` gets from numpy's tile. ``bits``: the instance (default `width`; tests run each)."""
    lib = _library()
    bits = width() if bits is None else bits
    if lib is None or not 0 < bits <= width():
        raise RuntimeError(f"the fused top-2 kernel cannot run the {bits}-bit instance (built: {width()} bits)")
    xa = np.ascontiguousarray(xa, dtype=np.float32)
    b, n = xa.shape
    if padded.shape[0] != n or padded.shape[1] % _COLUMNS or not 0 < k <= padded.shape[1]:
        raise ValueError(f"base of shape {padded.shape} for {n} terms and {k} columns")
    j1, second = np.empty(b, dtype=np.int64), np.empty(b, dtype=np.float32)
    if b:
        lib.fused_top2(bits, xa, b, n, padded, k, padded.shape[1], j1, second)
    return j1, second.astype(np.float64)
