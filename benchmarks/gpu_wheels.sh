#!/usr/bin/env bash
# The packages benchmarks/gpu_check.sh needs that the lent GPU machines' image lacks (its python3 is CPython 3.12
# with torch, torchvision, numpy, pyyaml, pillow, typer, tqdm, matplotlib, scipy), as CPython 3.12 manylinux wheels
# in .whl/ (git-ignored; 28 MB, 19 of them faiss-cpu, bench_kmeans' baseline; ijson reads the annotation files), at the versions this checkout's
# .venv holds. Run here, where pip can download; the device call carries .whl.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p .whl
for name in zarr numcodecs donfig google-crc32c pycocotools ijson faiss-cpu; do
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))")
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
ls -l .whl
