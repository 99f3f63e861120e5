"""The one compiled part: k-means' fused GEMM + top-2 (pipeline/geometry/fused_top2.c), loaded with ctypes by
pipeline.geometry.kmeans_fused. Optional: where it does not build (no C compiler), the install goes on and the CPU
search runs numpy's GEMM, with the same assignments. Everything else is in pyproject.toml."""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCES = ["pipeline/geometry/fused_top2.c", "pipeline/geometry/fused_top2_kernel.h"]
# compiled in, so that kmeans_fused can refuse a build older than its sources (kmeans_fused.source_hash); a source
# missing (a partial sdist) leaves the optional build to fail, not the install
try:
    digest = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes() for name in SOURCES)).hexdigest()[:16]
except OSError:
    digest = "unknown"

setup(
    ext_modules=[
        Extension(
            "pipeline.geometry._fused_top2",
            sources=SOURCES[:1],
            depends=SOURCES[1:],
            define_macros=[("FUSED_TOP2_SOURCE", f'"{digest}"')],
            extra_compile_args=["-O3", "-ffp-contract=fast", "-Wno-psabi"],
            optional=True,
        )
    ]
)
