"""DDP embedding: `embed` with `dist.nproc: 2` (torchrun, gloo, CPU) trains the one-process head up to the order
of floating-point sums (far within the spread of the seeds), and a 2-rank run killed mid-way resumes to the head
of an uninterrupted 2-rank run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.stores.store import open_store
from tests.models.test_embedding_resume import saved_step, stage_dir
from tests.test_e2e import rank_pid

ROOT = Path(__file__).resolve().parents[2]


def configure(path: Path, **embed) -> Path:
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["dist"]["nproc"] = embed.pop("nproc", 1)
    params["embed"].update(embed)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path


def start_embed(path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    with open(path / "output.txt", "w") as output:
        return subprocess.Popen([sys.executable, "-m", "stages.embed"], cwd=path, env=env, stdout=output, stderr=output)


def run_embed(path: Path) -> dict:
    assert start_embed(path).wait(timeout=600) == 0, (path / "output.txt").read_text()[-3000:]
    saved = torch.load(path / "models/embedder.pt", weights_only=True)
    embeddings = np.asarray(open_store(path / "data/val/embeddings.zarr", "embeddings")["embeddings"][...])
    return {"final": saved["meta"]["history"][-1], "embeddings": embeddings, "state": saved["state_dict"]}


def test_two_ranks_train_the_one_process_head_within_the_seeds_spread(tmp_path):
    one = {seed: run_embed(configure(stage_dir(tmp_path / f"one{seed}", 0), seed=seed)) for seed in (0, 1, 2)}
    two = run_embed(configure(stage_dir(tmp_path / "two", 0), seed=0, nproc=2))
    output = (tmp_path / "two/output.txt").read_text()
    assert output.count("[embed]") == 1 and "x 2 rank(s)" in output  # rank 0's summary only
    for name in ("total", "mask", "object", "hier", "d0_parent", "d0_child"):
        spread = max(r["final"][name] for r in one.values()) - min(r["final"][name] for r in one.values())
        assert abs(two["final"][name] - one[0]["final"][name]) < spread / 100, name
    assert two["final"]["triplets"] == one[0]["final"]["triplets"]  # the same global batches
    between_seeds = np.abs(one[1]["embeddings"] - one[0]["embeddings"]).max()
    assert np.abs(two["embeddings"] - one[0]["embeddings"]).max() < between_seeds / 100
    for key, value in one[0]["state"].items():
        torch.testing.assert_close(
            two["state"][key], value, rtol=0, atol=1e-3
        )  # Adam magnifies the sums' order on tiny weights


@pytest.mark.parametrize("victim", [1])
def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_head(tmp_path, victim):
    epochs = dict(epochs=30, checkpoint_every=4, nproc=2)
    reference = run_embed(configure(stage_dir(tmp_path / "reference", 0), **epochs))
    killed = configure(stage_dir(tmp_path / "killed", 0), **epochs)
    state = killed / "checkpoints/embed/state.pt"
    proc = start_embed(killed)
    deadline = time.monotonic() + 300
    while saved_step(state) < 8:
        assert proc.poll() is None, (killed / "output.txt").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pid = rank_pid(victim, killed)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) == 1
    output = (killed / "output.txt").read_text()
    assert f"error: stages.embed: rank {victim} of 2 was killed by SIGKILL" in output
    assert not (killed / "models/embedder.pt").exists()
    at = saved_step(state)
    resumed = run_embed(killed)
    assert f"resumed from step {at} of" in (killed / "output.txt").read_text()
    assert resumed["final"] == reference["final"]
    for key, value in reference["state"].items():
        assert torch.equal(resumed["state"][key], value), key
    assert np.array_equal(resumed["embeddings"], reference["embeddings"])
