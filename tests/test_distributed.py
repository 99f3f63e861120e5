"""Ranks from torchrun's environment (pipeline.distributed); the sharded stages are run by torchrun in
tests/test_e2e.py."""

import pytest

from pipeline.distributed import (
    Ranks,
    barrier,
    init_ranks,
    launch_ranks,
    main_first,
    main_goes_on,
    rank_device,
    shutdown,
)
from pipeline.errors import PipelineError


def test_without_torchrun_one_process_and_nothing_collective(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = init_ranks("cpu")
    assert ranks == Ranks(0, 1, 0) and ranks.is_main
    order = []
    with main_first(ranks):
        order.append("body")
    barrier(ranks)
    assert main_goes_on(ranks)
    shutdown(ranks)
    assert order == ["body"]
    assert rank_device("cuda", ranks) == "cuda"
    assert rank_device("cuda", Ranks(3, 4, 1)) == "cuda:1"
    assert rank_device("cpu", Ranks(3, 4, 1)) == "cpu"


@pytest.mark.parametrize(
    ("env", "message"), [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"), ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2")]
)
def test_bad_environment_is_a_one_line_error(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PipelineError, match=message):
        init_ranks("cpu")


def test_launch_ranks_only_from_a_plain_process_asking_for_several(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert not launch_ranks("stages.propose", 1, "cpu")  # one rank: the process itself
    monkeypatch.setenv("RANK", "0")
    assert not launch_ranks("stages.propose", 2, "cpu")  # already a rank: never launched twice


def test_launch_ranks_needs_a_gpu_per_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(PipelineError, match="dist.nproc = 2 ranks asked for, but this machine has 1 GPU"):
        launch_ranks("stages.propose", 2, "cuda")
