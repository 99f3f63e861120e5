"""Ranks from torchrun's environment (pipeline.distributed); the sharded stages are run by torchrun in
tests/test_e2e.py."""

import os

import pytest

from pipeline.distributed import (
    Ranks,
    all_gather,
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


def test_cpu_ranks_keep_the_thread_count_and_sleep_when_idle(monkeypatch):
    """The launched ranks inherit a one-process run's OMP_NUM_THREADS (the stores' bytes depend on it) and
    OMP_WAIT_POLICY=PASSIVE (they share the cores); values the user set are kept."""
    import torch
    import torch.distributed.run as torchrun

    launched = []
    monkeypatch.setattr(torchrun, "run", lambda args: launched.append(args))
    for name in ("RANK", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")  # recorded, so that what launch_ranks sets is undone after the test
        monkeypatch.delenv(name)
    assert launch_ranks("stages.propose", 2, "cpu", ["--split", "val"])
    assert os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert launched[0].nproc_per_node == "2" and launched[0].training_script_args == ["--split", "val"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert launch_ranks("stages.propose", 2, "cpu", [])
    assert (os.environ["OMP_NUM_THREADS"], os.environ["OMP_WAIT_POLICY"]) == ("3", "ACTIVE")


def test_all_gather_with_one_rank_is_the_value_itself():
    assert all_gather({"k": 3}, Ranks()) == [{"k": 3}]
