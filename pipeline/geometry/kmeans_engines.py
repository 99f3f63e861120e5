"""The search engines of the nearest-centroid assignment (kmeans_assign): which one runs, and its plumbing.

- CPU (the default without a GPU, or ``use_gpu=False``): the float32 / float64 GEMM of kmeans_assign in
  tiles of rows on `threads` worker threads (torch's intra-op thread count), with BLAS held to one thread per
  worker (`_one_blas_thread`, threadpoolctl). It needs no faiss.
- GPU (faiss-gpu sees a GPU: `visible_gpus`): a faiss ``IndexFlatIP`` in float32, replicated on every GPU of
  ``devices`` (default every visible one; a torchrun rank passes its own), each searching a share of the rows;
  one ``StandardGpuResources`` per GPU is kept for the process.
- GPU through torch (torch sees a CUDA GPU, faiss does not: faiss-cpu, or no faiss-gpu wheel for the machine's
  CUDA): the float64 GEMM and its top-2 on one GPU (``devices[0]``, default the current one), the certificate
  on the CPU. float64 needs no float32 pass: the rows it leaves open are true near-ties.

`_Faiss` is the engine an assignment runs with; `search_name` and `faiss_backend` say in words what runs and which
faiss this process has. faiss is optional: installed without the cpu / gpu extra, ``faiss`` is None.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

try:
    import faiss
except ImportError:  # installed without the cpu / gpu extra: the CPU's float64 GEMM needs no faiss
    faiss = None

from pipeline.errors import PipelineError
from pipeline.geometry import kmeans_fused

log = logging.getLogger(__name__)


def visible_gpus() -> int:
    """How many GPUs faiss sees (0 with faiss-cpu, or without faiss)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _faiss_version() -> str:
    return f"faiss {faiss.__version__}" if faiss is not None else "no faiss"


def faiss_backend() -> str:
    """Which faiss this process has: "faiss <version> on gpu" when faiss sees a GPU (faiss-gpu with CUDA), else
    "... on cpu". (On the CPU the assignment's search is the float64 GEMM, not faiss: see `_Faiss.name`.)"""
    return f"{_faiss_version()} on {'gpu' if visible_gpus() > 0 else 'cpu'}"


def cuda_devices() -> int:
    """How many CUDA GPUs torch sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def threads() -> int:
    """Worker threads of the float64 engine: torch's intra-op thread count (OMP_NUM_THREADS under torchrun)."""
    return max(1, torch.get_num_threads())


_CONTROLLER = None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS on one thread inside the block (the workers are the parallelism), restored after."""
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield


_RESOURCES: dict[int, Any] = {}  # one faiss StandardGpuResources per GPU id, kept for the process
_LOGGED: set[str] = set()


def _gpu_devices(use_gpu: bool | None, devices: Sequence[int] | None) -> list[int]:
    """The GPU ids the search uses: none when ``use_gpu`` is False or faiss sees no GPU, else ``devices`` (default
    every visible one); PipelineError when ``use_gpu`` is True and there is none."""
    n_gpus = visible_gpus()
    if use_gpu and n_gpus == 0 and cuda_devices() == 0:
        raise PipelineError("use_gpu=True but neither faiss nor torch sees a GPU")
    if n_gpus == 0 or use_gpu is False:
        return []
    chosen = [int(g) for g in (range(n_gpus) if devices is None else devices)]
    bad = [g for g in chosen if not 0 <= g < n_gpus]
    if not chosen or bad:
        raise PipelineError(f"GPU devices {list(chosen)} are not among the {n_gpus} GPUs faiss sees")
    return chosen


def _torch_device(use_gpu: bool | None, devices: Sequence[int] | None) -> torch.device | None:
    """The CUDA device of the torch float64 search: when faiss sees no GPU but torch does and ``use_gpu`` is not
    False, ``devices[0]`` (a torchrun rank's own) or torch's current device; else None."""
    n_cuda = cuda_devices()
    if use_gpu is False or visible_gpus() > 0 or n_cuda == 0:
        return None
    index = int(devices[0]) if devices else torch.cuda.current_device()
    if not 0 <= index < n_cuda:
        raise PipelineError(f"GPU device {index} is not among the {n_cuda} GPUs torch sees")
    return torch.device("cuda", index)


def _describe(gpus: list[int], device: torch.device | None, fused: bool) -> str:
    """An engine in words: faiss on the GPUs ``gpus``, else torch's float64 GEMM on ``device``, else the CPU's
    (through kmeans_fused's kernel when ``fused``)."""
    if gpus:
        return f"{_faiss_version()} float32 on GPU {gpus} + float64 certificate"
    if device is not None:
        return f"torch float64 GEMM on {device} ({_faiss_version()} sees no GPU) + float64 certificate"
    kernel = f", GEMM and top-2 fused up to d = 64 ({kmeans_fused.width()}-bit kernel)" if fused else ""
    return f"float32/float64 GEMM on cpu, {threads()} threads{kernel} ({_faiss_version()} sees no GPU or use_gpu=False)"


def search_name(use_gpu: bool | None = None, devices: Sequence[int] | None = None) -> str:
    """What `assign` runs with these arguments, in words: faiss on which GPUs, torch's float64 GEMM on a GPU,
    or the CPU's float32 / float64 GEMM."""
    gpus = _gpu_devices(use_gpu, devices)
    return _describe(gpus, None if gpus else _torch_device(use_gpu, devices), kmeans_fused.width() > 0)


class _Faiss:
    """The search engine of an assignment: faiss float32 on GPUs (``use_gpu`` None and a GPU, or True; the ids
    ``devices``, default every visible GPU), else torch's float64 GEMM on a CUDA GPU that faiss does not see
    (``torch_device``), else the float32 / float64 GEMM on the CPU, through kmeans_fused's kernel up to d = 64
    when ``fused`` (default: where it is built; False: numpy's GEMM, for tests and benchmarks). ``force_faiss_cpu``
    runs the faiss float32 path on the CPU, ``force_torch`` the torch path on that device (tests of their
    certificates). ``name`` says which (INFO once per process)."""

    def __init__(
        self,
        use_gpu: bool | None,
        devices: Sequence[int] | None = None,
        *,
        force_faiss_cpu: bool = False,
        force_torch: str | None = None,
        fused: bool | None = None,
    ) -> None:
        self.devices = _gpu_devices(use_gpu, devices)
        if force_faiss_cpu and faiss is None:
            raise PipelineError("the faiss float32 search needs faiss (make setup installs faiss-cpu)")
        if fused and kmeans_fused.width() == 0:
            raise PipelineError("fused=True but the fused top-2 kernel is not built (setup.py needs a C compiler)")
        self.gpu = bool(self.devices)
        self.faiss = self.gpu or force_faiss_cpu
        self.threads = threads()
        if force_torch is not None:
            self.torch_device = torch.device(force_torch)
        else:
            self.torch_device = None if self.faiss else _torch_device(use_gpu, devices)
        cpu = not self.faiss and self.torch_device is None
        self.fused = cpu and (kmeans_fused.width() > 0 if fused is None else fused)
        if self.gpu:
            for g in self.devices:
                if g not in _RESOURCES:
                    _RESOURCES[g] = faiss.StandardGpuResources()
        forced = f"{_faiss_version()} float32 on cpu" if force_faiss_cpu else None
        self.name = forced or _describe(self.devices, self.torch_device, self.fused)
        log.log(logging.DEBUG if self.name in _LOGGED else logging.INFO, "nearest-centroid search: %s", self.name)
        _LOGGED.add(self.name)

    def index(self, base32: np.ndarray) -> Any:
        """A flat inner-product index holding ``base32`` (K, n) float32, replicated on every GPU of ``devices``
        (each searches a share of the queries), searched with ``.search(queries, k)``."""
        index = faiss.IndexFlatIP(base32.shape[1])
        index.add(np.ascontiguousarray(base32, dtype=np.float32))
        if self.gpu:
            if len(self.devices) == 1:
                return faiss.index_cpu_to_gpu(_RESOURCES[self.devices[0]], self.devices[0], index)
            options = faiss.GpuMultipleClonerOptions()
            options.shard = False  # replicas: the K centroids are small, the N queries are split across GPUs
            resources = [_RESOURCES[g] for g in self.devices]
            return faiss.index_cpu_to_gpu_multiple_py(resources, index, options, self.devices)
        return index
