"""Streamed embedding training: equal to the former in-memory training on one block, the same with reader
processes, and resumed after an interruption (or a SIGKILL of the stage) to the very same head."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.models import embedding_data
from pipeline.models.embedding import embed_features
from pipeline.models.embedding_data import block_bounds, block_order
from pipeline.models.embedding_train import train_embedder
from pipeline.stores.checkpoint import Checkpoint
from pipeline.stores.store import open_store, write_store
from stages import embed as embed_stage
from tests.models.test_embedding import synthetic
from tests.models.test_embedding_data import ragged_world, store_inputs, write_samples

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
IN_MEMORY_COMMIT = (
    "14abbf48b6846d2c28920ac5e5f8771cc7617a7f"  # the last pipeline/embedding.py holding the split in memory
)
# where the modules it imports live since pipeline/ was grouped by concern
MOVED_SINCE = {"pipeline.hyperbolic": "pipeline.geometry.hyperbolic", "pipeline.store": "pipeline.stores.store"}
ARGS = dict(hidden=[16], dim=4, weights={"mask": 1.0, "object": 1.0, "hier": 1.0}, lr=3e-3, progress=False)


def timeless(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def as_in_memory(history):
    """The history without its times and the active-triplet shares the in-memory code did not log."""
    return [{k: v for k, v in h.items() if not k.startswith("active/")} for h in timeless(history)]


def assert_same_head(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    """pipeline/embedding.py as committed before streaming (whole split in memory, on the device)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{IN_MEMORY_COMMIT}:pipeline/embedding.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # a shallow clone
        pytest.skip("the git history holding the in-memory training is not available")
    for old, new in MOVED_SINCE.items():
        source = source.replace(f"from {old} import", f"from {new} import")
    path = tmp_path_factory.mktemp("old") / "in_memory_embedding.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("in_memory_embedding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ equality


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"weights": {"mask": 0.0, "object": 1.0, "hier": 1.0}},
        {"geometry": "euclidean", "epochs": 4, "batch_size": 7},
        {"max_eval_pairs": 10, "same_image_negatives": 0.8},
    ],
    ids=["all-terms", "no-mask", "euclidean-odd-batches", "eval-subset"],
)
def test_one_block_trains_exactly_as_the_in_memory_code(in_memory, kw):
    data = synthetic()
    args = dict(hidden=32, dim=8, weights={"mask": 1.0, "object": 1.0, "hier": 1.0}, lr=3e-3, epochs=3)
    args.update(batch_size=64, seed=2, progress=False)
    args.update(kw)
    old_head, old_history = in_memory.train_embedder(*data, **args)
    head, history = train_embedder(*data, **args)
    assert_same_head(old_head, head)
    assert as_in_memory(history) == timeless(old_history)


def test_one_block_read_from_a_float16_store_equals_the_in_memory_code(in_memory, tmp_path):
    data = ragged_world(n_images=60, d=24, seed=3)
    group = write_samples(tmp_path / "samples.zarr", data, "float16")
    features, offsets, obj, hier = data
    args = dict(ARGS, epochs=3, batch_size=32, seed=1)
    old_head, old_history = in_memory.train_embedder(
        {k: group[f"features/{k}"][...] for k in features}, offsets, obj, hier, **args
    )
    head, history = train_embedder(*store_inputs(group), **args)
    assert_same_head(old_head, head)
    assert as_in_memory(history) == timeless(old_history)


def test_reader_processes_give_the_same_weights(tmp_path):
    group = write_samples(tmp_path / "samples.zarr", ragged_world(n_images=60, seed=4))
    args = dict(ARGS, epochs=3, batch_size=8, seed=0, block_rows=40)
    head0, history0 = train_embedder(*store_inputs(group), num_workers=0, **args)
    head2, history2 = train_embedder(*store_inputs(group), num_workers=2, **args)
    assert_same_head(head0, head2)
    assert timeless(history0) == timeless(history2)


# -------------------------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


class StopAfter(Checkpoint):
    """A checkpoint whose run is interrupted right after saving step `stop` (as a kill would)."""

    def __init__(self, stop, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop = stop

    def save(self, state):
        super().save(state)
        if state["step"] == self.stop:
            raise Interrupted(state["position"])


def resume_data(tmp_path):
    group = write_samples(tmp_path / "samples.zarr", ragged_world(n_images=50, seed=5))
    args = dict(ARGS, epochs=3, batch_size=8, seed=0, block_rows=30)
    bounds = block_bounds(group["image_offsets"][...], 30)
    steps = [-(-int(s) // 8) for s in np.diff(bounds)]
    first_block = steps[int(block_order(0, 0, len(steps))[0])]
    per_epoch = sum(steps)
    return group, args, {"first": 1, "mid-block": 2, "block-end": first_block, "epoch-end": per_epoch,
                         "next-epoch": per_epoch + 1, "last": 3 * per_epoch}  # fmt: skip


@pytest.mark.parametrize("where", ["first", "mid-block", "block-end", "epoch-end", "next-epoch", "last"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, caplog, where):
    group, args, stops = resume_data(tmp_path)
    stop = stops[where]
    logged = []
    reference, ref_history = train_embedder(*store_inputs(group), log=lambda e, m: logged.append((e, m)), **args)
    root, key = tmp_path / "checkpoints", {"run": 1}
    with pytest.raises(Interrupted) as info:
        train_embedder(*store_inputs(group), checkpoint=StopAfter(stop, "embed", key, root), checkpoint_every=1, **args)
    if where == "block-end":
        assert info.value.args[0] == (0, 1, 0)  # the next step starts the next block
    if where == "epoch-end":
        assert info.value.args[0][0] == 0 and info.value.args[0][2] == 0  # epoch 0 done, its evaluation pending
    relogged = []
    with caplog.at_level(logging.INFO, logger="pipeline.models.embedding_train"):
        head, history = train_embedder(
            *store_inputs(group), log=lambda e, m: relogged.append((e, m)), checkpoint=Checkpoint("embed", key, root),
            checkpoint_every=4, num_workers=2 if where == "mid-block" else 0, **args,
        )  # fmt: skip
    assert f"resumed from step {stop} of {stops['last']}" in caplog.text
    assert_same_head(reference, head)
    assert timeless(history) == timeless(ref_history)
    # every epoch logged once, in order, the saved ones again: a fresh dvclive run ends up complete
    assert [(e, {k: v for k, v in m.items() if k != "seconds"}) for e, m in relogged] == [
        (e, {k: v for k, v in m.items() if k != "seconds"}) for e, m in logged
    ]


def test_checkpoints_of_another_key_or_plan_are_ignored(tmp_path, caplog):
    group, args, _ = resume_data(tmp_path)
    root = tmp_path / "checkpoints"
    with pytest.raises(Interrupted):
        train_embedder(
            *store_inputs(group), checkpoint=StopAfter(5, "embed", {"run": 1}, root), checkpoint_every=5, **args
        )
    reference, ref_history = train_embedder(*store_inputs(group), **args)
    with caplog.at_level(logging.INFO):
        head, history = train_embedder(*store_inputs(group), checkpoint=Checkpoint("embed", {"run": 2}, root), **args)
    assert "resumed" not in caplog.text and "another run" in caplog.text
    assert_same_head(reference, head)
    assert timeless(history) == timeless(ref_history)

    caplog.clear()
    with pytest.raises(Interrupted):
        train_embedder(
            *store_inputs(group), checkpoint=StopAfter(5, "embed", {"run": 1}, root), checkpoint_every=5, **args
        )
    other = dict(args, block_rows=60)  # same key, another plan: not resumable
    reference, _ = train_embedder(*store_inputs(group), **other)
    with caplog.at_level(logging.INFO):
        head, _ = train_embedder(*store_inputs(group), checkpoint=Checkpoint("embed", {"run": 1}, root), **other)
    assert "resumed" not in caplog.text and "another training plan" in caplog.text
    assert_same_head(reference, head)


# ---------------------------------------------------------------------------------- the stage, killed

RUN_STAGE = """
import sys, time
import torch
torch.set_num_threads(1)
from pipeline.models import embedding_data, embedding_train
embedding_data.BLOCK_BYTES = 6_000  # several blocks of images even on this tiny split
delay = float(sys.argv[1])
if delay:  # slow steps, so that the test can kill the run in the middle
    hier_hinges = embedding_train.hier_hinges
    def slow(*args, **kwargs):
        time.sleep(delay)
        return hier_hinges(*args, **kwargs)
    embedding_train.hier_hinges = slow
from stages.embed import main
main(params_file="params.yaml")
"""


def stage_dir(path: Path, num_workers: int) -> Path:
    """A working folder for `python -m stages.embed`: params and the four input stores (tiny, float16)."""
    path.mkdir()
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["device"] = "cpu"
    p["embed"].update(hidden=16, dim=4, epochs=6, batch_size=16, lr=3e-3, num_workers=num_workers, checkpoint_every=4)
    (path / "params.yaml").write_text(yaml.safe_dump(p))
    for split, seed in (("train", 6), ("val", 7)):
        data = ragged_world(n_images=40, d=16, seed=seed)
        proposals = write_store(path / f"data/{split}/proposals.zarr", {"image_offsets": data[1]}, {}, "proposals")
        features, offsets, obj, hier = data
        arrays = {f"features/{k}": v.astype("float16") for k, v in features.items()}
        arrays.update({"image_offsets": offsets, "pairs/object": obj, "pairs/hier": hier})
        write_store(path / f"data/{split}/samples.zarr", arrays, {"source_fingerprint": proposals}, "samples")
    (path / "run.py").write_text(RUN_STAGE)
    return path


def run_stage(path: Path, delay: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1")
    with open(path / "output.txt", "w") as output:  # a file, not a pipe nobody reads while polling
        return subprocess.Popen([sys.executable, "run.py", str(delay)], cwd=path, env=env, stdout=output, stderr=output)


def saved_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False)["state"]["step"])
    except (OSError, EOFError, RuntimeError):
        return -1


def curve(path: Path, name: str) -> list[tuple[str, str]]:
    lines = (path / f"dvclive/embed/plots/metrics/train/{name}.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [tuple(line.split("\t")[head.index(c)] for c in ("step", name)) for line in lines[1:]]


def test_a_killed_embed_stage_resumes_to_the_same_head(tmp_path, monkeypatch):
    killed = stage_dir(tmp_path / "killed", num_workers=0)
    state = killed / "checkpoints/embed/state.pt"
    proc = run_stage(killed, delay=0.03)
    deadline = time.monotonic() + 120
    while saved_step(state) < 12:  # a checkpoint from the middle of the run (6 epochs of about 18 steps)
        assert proc.poll() is None, (killed / "output.txt").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "models/embedder.pt").exists()
    killed_at = saved_step(state)
    again = run_stage(killed)

    # meanwhile, an uninterrupted run here, with reader processes (same blocks as the subprocess)
    monkeypatch.chdir(stage_dir(tmp_path / "reference", num_workers=2))
    monkeypatch.setattr(embedding_data, "BLOCK_BYTES", 6_000)
    embed_stage.main(params_file="params.yaml")
    assert not Path("checkpoints/embed/state.pt").exists()

    assert again.wait(timeout=300) == 0, (killed / "output.txt").read_text()
    resumed = re.search(r"resumed from step (\d+) of (\d+)", (killed / "output.txt").read_text())
    assert resumed and int(resumed[1]) == killed_at and killed_at < int(resumed[2])
    assert not state.exists()  # cleared once the outputs are written
    a = torch.load(killed / "models/embedder.pt", weights_only=True)
    b = torch.load(tmp_path / "reference/models/embedder.pt", weights_only=True)
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert all("seconds" not in h for h in b["meta"]["history"]) and len(b["meta"]["history"]) == 6
    # no run time in the hashed output: the same bytes, though one run was killed and the other had readers
    assert (killed / "models/embedder.pt").read_bytes() == (tmp_path / "reference/models/embedder.pt").read_bytes()
    for split_store in ("killed", "reference"):
        assert open_store(tmp_path / split_store / "data/val/embeddings.zarr", "embeddings")["embeddings"].shape[0]
    fingerprints = {
        open_store(tmp_path / d / "data/val/embeddings.zarr", "embeddings").attrs["fingerprint"]
        for d in ("killed", "reference")
    }
    assert len(fingerprints) == 1
    for name in ("total", "hier", "d0_parent"):  # every epoch once in the resumed run's curves
        assert curve(killed, name) == curve(tmp_path / "reference", name)
        assert [s for s, _ in curve(killed, name)] == [str(e) for e in range(6)]


def test_streamed_embeddings_store_is_the_bytes_write_store_makes(tmp_path):
    features = ragged_world(n_images=30, d=8, seed=8)
    box, offsets = features[0]["box"], features[1]
    head = train_embedder(*features, **dict(ARGS, epochs=1, batch_size=16))[0]
    attrs = {"split": "val", "dim": 4}
    streamed = embed_stage.write_embeddings(tmp_path / "a.zarr", head, box.astype("float16"), offsets, attrs, "cpu")
    whole = {"embeddings": embed_features(head, box.astype("float16")), "image_offsets": offsets}
    assert write_store(tmp_path / "b.zarr", whole, attrs, "embeddings") == streamed
    files = sorted(p.relative_to(tmp_path / "a.zarr") for p in (tmp_path / "a.zarr").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b.zarr") for p in (tmp_path / "b.zarr").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a.zarr" / f).read_bytes() == (tmp_path / "b.zarr" / f).read_bytes()
