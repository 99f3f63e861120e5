# One entry point: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install the pinned dependencies first (idempotent: a stamp file
# records the pyproject.toml the environment was built from).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Which faiss build the environment holds: cpu (faiss-cpu, the default) or gpu (faiss-gpu-cu12, `make setup-gpu`).
# Both install the same `faiss` module, so switching removes the other first; the choice is kept in .venv/.faiss.
FAISS ?= $(shell cat $(VENV)/.faiss 2>/dev/null || echo cpu)

.PHONY: setup setup-gpu setup-cpu repro test lint format bench tables tables-deep sweep clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py pipeline/geometry/fused_top2.c pipeline/geometry/fused_top2_kernel.h
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	@case "$(FAISS)" in cpu|gpu) ;; *) echo "error: FAISS must be cpu or gpu, got '$(FAISS)'"; exit 1;; esac
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ "$$(cat $(VENV)/.faiss 2>/dev/null || echo cpu)" != "$(FAISS)" ]; then $(BIN)/python -m pip uninstall --quiet -y faiss-cpu faiss-gpu-cu12; fi
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev,$(FAISS)]"
	@# the bytecode on every core (pip compiles one file at a time: 48 s of a 107 s set-up on 2 cores, against 19-27 s),
	@# but for the libraries' own test folders, which nothing imports (a fifth of the sources: 16.5 s instead of 20.5);
	@# a file that does not compile is left to the interpreter, as pip leaves it; where the parallel pass cannot run at
	@# all, a serial one does (after a parallel pass it only looks again at the files that did not compile)
	$(BIN)/python -m compileall -qq -j 0 -x '/tests?/' $(VENV)/lib || $(BIN)/python -m compileall -qq -x '/tests?/' $(VENV)/lib || true
	@# setup.py's one C kernel is optional (k-means' fused top-2): say whether it was built, pip --quiet does not
	@$(BIN)/python -c "from pipeline.geometry import kmeans_fused as f; w = f.width(); print('k-means fused top-2 kernel:', f'{w}-bit' if w else 'not built (no C compiler?): the CPU search runs numpy GEMM, same results')"
	echo $(FAISS) > $(VENV)/.faiss
	touch $(STAMP)

# faiss-gpu (CUDA 12) instead of faiss-cpu: cluster's search then runs on every visible GPU; setup-cpu goes back
setup-gpu:
	rm -f $(STAMP)
	$(MAKE) setup FAISS=gpu
	$(BIN)/python -c "import faiss; print('faiss', faiss.__version__, 'sees', faiss.get_num_gpus(), 'GPU(s)')"

setup-cpu:
	rm -f $(STAMP)
	$(MAKE) setup FAISS=cpu

repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m stages.summary

test: $(STAMP)
	$(BIN)/python -m pytest -q

tables: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m stages.tables

tables-deep: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m stages.tables --world deep

sweep: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m stages.sweep

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf data models plots .dvc/tmp metrics/detections_*.json
