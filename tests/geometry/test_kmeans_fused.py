"""The fused GEMM + top-2 kernel (kmeans_fused, fused_top2.c), both precisions and every instance this CPU runs:
on small integers, where every product and sum is exact, it must give numpy's argmin (ties to the lowest column)
and second minimum bit for bit, over block edges (rows not a multiple of its row block, columns not a multiple of
32, one column, one term); on random data its entries must stay within the rounding bound the certificate assumes.
The rows' last term is 1, as in kmeans_terms' x'' (the kernel starts each sum from the base's last row). A build
that does not load, or that is older than its sources, is refused. The assignment with and without the kernel is
compared in test_kmeans_assign (engines "cpu" and "cpu-numpy")."""

from __future__ import annotations

import logging
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.geometry import kmeans_engines as ke
from pipeline.geometry import kmeans_fused as kf
from pipeline.geometry.kmeans import assign

BUILT = kf.width() > 0
INSTANCES = [bits for bits in (128, 256, 512) if bits <= kf.width()]
REALS = [np.float32, np.float64]
needs_kernel = pytest.mark.skipif(not BUILT, reason="the fused kernel is not built (no C compiler at install)")


def ones_last(xa: np.ndarray) -> np.ndarray:
    """``xa`` with its last column set to 1, as the kernel requires."""
    xa[:, -1] = 1
    return xa


def numpy_top2(xa: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kmeans_assign._top2's semantics: argmin per row, then the minimum with that entry masked."""
    tile = xa.astype(np.float64) @ base.astype(np.float64)
    j1 = tile.argmin(axis=1)
    tile[np.arange(len(j1)), j1] = np.inf
    return j1, tile.min(axis=1)


def test_built_where_setup_found_a_c_compiler():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the CPU search runs numpy's GEMM")
    assert kf.width() in (128, 256, 512), "setup.py should have built pipeline/geometry/_fused_top2"


@needs_kernel
@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("bits", INSTANCES)
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 1, 3), (7, 2, 1), (13, 31, 5), (37, 32, 18), (50, 33, 18)])
def test_exact_on_integers_at_block_edges(real, bits, rows, k, n):
    rng = np.random.default_rng(rows * 100 + k)
    xa = ones_last(rng.integers(-3, 4, size=(rows, n)).astype(real))
    base = rng.integers(-3, 4, size=(n, k)).astype(real)
    j1, second = kf.top2(xa, kf.pad(base), k, bits)
    ref_j1, ref_second = numpy_top2(xa, base)
    np.testing.assert_array_equal(j1, ref_j1)
    np.testing.assert_array_equal(second, ref_second)  # inf with one column, as numpy's masked min


@needs_kernel
@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("bits", INSTANCES)
def test_ties_go_to_the_lowest_column_in_any_lane(real, bits):
    rng = np.random.default_rng(0)
    n, k = 4, 1462
    base = rng.integers(-3, 4, size=(n, k)).astype(real)
    xa = ones_last(rng.integers(-3, 4, size=(300, n)).astype(real))
    winners = np.unique(numpy_top2(xa, base)[0])[:3]
    # each of three rows' winning columns copied to later columns, in the next lane, another block and the last one
    copies = base.copy()
    for j in winners:
        for later in (j + 17, j + 700, k - 1):
            copies[:, min(later, k - 1)] = base[:, j]
    xa[:10, :-1] = 0  # every entry the base's last row: its first smallest, and the smallest of the others
    j1, second = kf.top2(xa, kf.pad(copies), k, bits)
    ref_j1, ref_second = numpy_top2(xa, copies)
    tied = np.flatnonzero(np.isin(ref_j1, winners) & (ref_second == (xa @ copies).min(axis=1)))
    assert tied.size > 10  # rows whose winner now has a later twin
    np.testing.assert_array_equal(j1, ref_j1)
    np.testing.assert_array_equal(second, ref_second)
    last = copies[-1].astype(np.float64)
    assert (j1[:10] == last.argmin()).all() and (second[:10] == np.partition(last, 1)[1]).all()


@needs_kernel
@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("bits", INSTANCES)
@pytest.mark.parametrize("n", [18, 66])
def test_entries_within_the_certificates_rounding_bound(real, bits, n):
    rng = np.random.default_rng(n)
    k = 1462
    xa = ones_last(rng.normal(size=(717, n)).astype(real))
    base = (rng.normal(size=(n, k)) * rng.lognormal(0, 2, size=(n, 1))).astype(real)
    j1, second = kf.top2(xa, kf.pad(base), k, bits)
    wide = np.longdouble  # float64's own rounding is far below float32's bound, but not below float64's
    exact = (xa.astype(wide) @ base.astype(wide)).astype(np.float64)
    scale = np.abs(xa).astype(np.float64) @ np.abs(base).astype(np.float64)
    unit = 2.0**-24 if real == np.float32 else 2.0**-53
    bound = (
        (n + 2) * unit * scale * 1.01
    )  # kmeans_terms._gamma's own part, any summation order (+1 %: exact's rounding)
    rows = np.arange(len(xa))
    assert (np.abs(exact[rows, j1] - exact.min(axis=1)) <= bound[rows, j1] + bound.max(axis=1)).all()
    masked = exact.copy()
    masked[rows, j1] = np.inf
    assert (np.abs(second - masked.min(axis=1)) <= bound.max(axis=1)).all()


@needs_kernel
def test_bad_arguments_are_refused():
    base = kf.pad(np.ones((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="terms"):
        kf.top2(np.ones((2, 4), dtype=np.float32), base, 5)
    with pytest.raises(ValueError, match="columns"):
        kf.top2(np.ones((2, 3), dtype=np.float32), base, 33)
    with pytest.raises(RuntimeError, match="1024-bit"):
        kf.top2(np.ones((2, 3), dtype=np.float32), base, 5, 1024)
    with pytest.raises(ValueError, match="float32 or float64"):
        kf.top2(np.ones((2, 3), dtype=np.float32), base.astype(np.float16), 5)
    with pytest.raises(ValueError, match="last term must be 1"):
        kf.top2(np.full((2, 3), 2, dtype=np.float32), base, 5)
    with pytest.raises(ValueError, match="terms"):
        kf.top2(np.ones((2, 0), dtype=np.float32), base[:0], 5)
    j1, second = kf.top2(np.ones((0, 3), dtype=np.float32), base, 5)
    assert j1.shape == second.shape == (0,)


def test_without_the_kernel_the_cpu_search_runs_numpy(monkeypatch):
    monkeypatch.setattr(kf, "width", lambda: 0)
    engine = ke._Faiss(False)
    assert not engine.fused and "fused" not in engine.name
    with pytest.raises(PipelineError, match="not built"):
        ke._Faiss(False, fused=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)) * 0.05
    a, _ = assign(x, x[:20], engine=engine)
    assert (a[:20] == np.arange(20)).all()


@needs_kernel
def test_the_cpu_engine_names_its_kernel():
    engine = ke._Faiss(False)
    assert engine.fused and f"{kf.width()}-bit kernel" in engine.name
    assert not ke._Faiss(False, fused=False).fused
    assert not ke._Faiss(False, force_torch="cpu").fused  # the torch search has its own top-2


def test_a_build_that_does_not_load_is_refused(tmp_path, caplog):
    import importlib.machinery

    (tmp_path / f"_fused_top2{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared library")
    with caplog.at_level(logging.WARNING):
        assert kf._library.__wrapped__(tmp_path) is None
    assert "does not load" in caplog.text


@needs_kernel
def test_a_build_older_than_its_sources_is_refused(tmp_path, caplog):
    import importlib.machinery

    here = Path(kf.__file__).parent
    built = next(
        here / f"_fused_top2{suffix}"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES  # the one `_library` loads
        if (here / f"_fused_top2{suffix}").is_file()
    )
    (tmp_path / built.name).write_bytes(built.read_bytes())
    for name in kf._SOURCES:
        (tmp_path / name).write_bytes((here / name).read_bytes())
    assert kf._library.__wrapped__(tmp_path) is not None  # the sources it was built from
    with (tmp_path / kf._SOURCES[0]).open("a") as source:
        source.write("/* edited since */\n")
    with caplog.at_level(logging.WARNING):
        assert kf._library.__wrapped__(tmp_path) is None
    assert "other sources" in caplog.text
    for name in kf._SOURCES:  # an installed wheel without its sources: nothing to compare, the build is used
        (tmp_path / name).unlink()
    assert kf._library.__wrapped__(tmp_path) is not None
