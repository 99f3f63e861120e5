"""The one compiled part: k-means' fused float32 GEMM + top-2 (pipeline/geometry/fused_top2.c), loaded with ctypes
by pipeline.geometry.kmeans_fused. Optional: where it does not build (no C compiler), the install goes on and the
CPU search runs numpy's GEMM, with the same assignments. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pipeline.geometry._fused_top2",
            sources=["pipeline/geometry/fused_top2.c"],
            depends=["pipeline/geometry/fused_top2_kernel.h"],
            extra_compile_args=["-O3", "-ffp-contract=fast", "-Wno-psabi"],
            optional=True,
        )
    ]
)
