"""The device param: auto picks CUDA only when present; anything unusable is a one-line PipelineError."""

import pytest
import torch

from pipeline.device import numeric_context, pick_device
from pipeline.errors import PipelineError


def test_auto_and_cpu():
    assert pick_device("cpu") == "cpu"
    assert pick_device(torch.device("cpu")) == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_is_given_back_or_refused_without_cuda(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match=f"device '{device}' asked for, but CUDA is not available"):
        pick_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(device) == device
    assert pick_device("auto") == "cuda"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "mps0", ""])
def test_unknown_devices_are_refused(device):
    with pytest.raises(PipelineError, match="unknown device"):
        pick_device(device)


def test_numeric_context_names_the_cpu_threads_only_on_the_cpu():
    threads = torch.get_num_threads()
    assert numeric_context("cpu") == {"device": "cpu", "threads": threads}
    assert numeric_context("cuda:1") == {"device": "cuda"}  # GPU kernels do not split by CPU thread
