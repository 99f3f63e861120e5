"""The torch device a stage runs on: the `device` param, resolved the same way by every stage."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def pick_device(device: str | torch.device) -> str:
    """'auto' -> 'cuda' when CUDA is available, else 'cpu'; 'cpu' and 'cuda[:n]' as given.

    Asking for CUDA where there is none, or for any other device, is a PipelineError (one line), not a
    failure deep inside torch on the first tensor moved.
    """
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise PipelineError(f"device {device!r} asked for, but CUDA is not available here (use auto or cpu)")
        return device
    raise PipelineError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:<n>)")


def numeric_context(device: str | torch.device) -> dict[str, int | str]:
    """What a run's floating-point results depend on besides its params and inputs, for the keys of resumable
    work (parts, checkpoints): the device type, and on the CPU torch's intra-op thread count (its kernels split
    reductions by thread, so 1 and 2 threads give different bits). A resume under another context starts over
    instead of mixing the two."""
    kind = torch.device(device).type
    return {"device": kind, "threads": torch.get_num_threads()} if kind == "cpu" else {"device": kind}


def use_batched(batched: bool | None, device: str | torch.device) -> bool:
    """Whether to do an image's per-mask work (the paste, the foreground crops) as one batch of image-sized
    tensors: ``batched`` when given, else on every device but the CPU. A GPU does the batch in microseconds; on
    the CPU each mask's own box or window is the faster way (README, "propose and sample"). Same bits either way."""
    return torch.device(device).type != "cpu" if batched is None else batched
