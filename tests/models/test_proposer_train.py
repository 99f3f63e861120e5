"""Training the proposer (`pipeline.models.proposer_train`): losses, resume after a kill, left-out images, the RoI
gradient and budget, ranks under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Params, Proposer
from pipeline.data.dataset import Manifest
from pipeline.data.proposer_data import CocoInstances
from pipeline.distributed import Ranks
from pipeline.errors import PipelineError
from pipeline.models.proposer import (
    build_model,
    load_checkpoint,
    propose,
    save_checkpoint,
)
from pipeline.models.proposer_train import _EpochBatches, _share, train_proposer
from pipeline.stores.checkpoint import Checkpoint

torch.set_num_threads(1)

SIZE = 64


def _image(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_training_lowers_loss_and_is_deterministic(proposer_world):
    path, root = proposer_world

    def run():
        torch.manual_seed(0)
        model = build_model("resnet18", SIZE)
        seen = []
        history = train_proposer(
            model, path, root, epochs=5, batch_size=2, lr=0.01, seed=3, device="cpu",
            log_step=lambda step, rec: seen.append(step), progress=False,
        )  # fmt: skip
        assert seen == list(range(len(history)))
        return [h["loss"] for h in history], history

    losses, history = run()
    assert len(losses) == 15 and {"loss", "lr", "loss_mask", "loss_objectness"} <= set(history[0])
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    again, _ = run()
    assert again == losses


def test_training_nan_is_reported(proposer_world):
    path, root = proposer_world
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE)
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(float("nan"))
    with pytest.raises(PipelineError, match="step 0"):
        train_proposer(model, path, root, epochs=1, batch_size=2, lr=0.01, seed=0, device="cpu", progress=False)


# --------------------------------------------------------------------------------------------------
# resumable training and left-out images

RUN = {"epochs": 4, "batch_size": 4, "lr": 0.01, "seed": 3}  # 6 images: batches of 4 and 2, 8 steps
REPO = Path(__file__).resolve().parents[2]

# a run in its own process, killed for real: it blocks in log_step at step `block_at` (after the
# checkpoint of step 3, with step 3's and 4's updates only in memory) until SIGKILL
_KILLABLE = """
import json, logging, sys, time
from pathlib import Path
import torch
from pipeline.stores.checkpoint import Checkpoint
from pipeline.models.proposer import build_model
from pipeline.models.proposer_train import train_proposer
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO)
coco_json, root, block_at, run = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
seen = []
def log_step(step, record):
    seen.append(step)
    if step == block_at:
        Path("blocked").write_text(str(step))
        time.sleep(300)
torch.manual_seed(0)
model = build_model("resnet18", 64)
history = train_proposer(model, coco_json, root, device="cpu", progress=False, log_step=log_step,
                         checkpoint=Checkpoint("train_proposer", {"run": 1}), checkpoint_every=3, **run)
torch.save(model.state_dict(), "final.pt")
Path("history.json").write_text(json.dumps({"history": list(history), "seen": seen,
                                            "resumed_from": history.resumed_from}))
"""


def _train(path, root, **kw):
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE)
    seen = []
    history = train_proposer(
        model, path, root, device="cpu", progress=False, log_step=lambda step, _: seen.append(step), **{**RUN, **kw}
    )
    return model.state_dict(), history, seen


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def uninterrupted(proposer_world):
    path, root = proposer_world
    return _train(path, root)


class _Stop(Exception):
    pass


def _stop_at(stop: int):
    """A `log_step` that interrupts training at step `stop` (after its update, before its checkpoint)."""

    def log_step(step: int, _record: dict) -> None:
        if step == stop:
            raise _Stop

    return log_step


@pytest.mark.parametrize(("n", "batch_size"), [(6, 2), (7, 2), (7, 3), (7, 7), (5, 1)])
def test_epoch_batches_are_a_shuffled_dataloader_s(n, batch_size):
    """Draw for draw the batches (and generator states) of DataLoader(shuffle=True); `skip` starts mid-epoch."""
    data = list(range(n))
    reference = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(4)
    )
    gen = torch.Generator().manual_seed(4)
    batches = _EpochBatches(n, batch_size, gen)
    ours = torch.utils.data.DataLoader(data, batch_sampler=batches, generator=gen)
    assert len(ours) == len(reference)
    for _ in range(3):
        start = gen.get_state()
        expected = [b.tolist() for b in reference]
        assert [b.tolist() for b in ours] == expected
        assert torch.equal(gen.get_state(), reference.generator.get_state())
        end = gen.get_state()
        for skip in range(len(expected)):  # resume at every batch of the epoch
            gen.set_state(start)
            batches.skip = skip
            assert [b.tolist() for b in ours] == expected[skip:]
            assert torch.equal(gen.get_state(), end)


def test_training_resumes_after_sigkill_with_the_same_weights(proposer_world, uninterrupted, tmp_path):
    path, root = proposer_world
    ref_state, ref_history, _ = uninterrupted
    argv = [sys.executable, "-c", _KILLABLE, str(path), str(root), "4", json.dumps(RUN)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = tmp_path / "checkpoints" / "train_proposer" / "state.pt"
    deadline = time.monotonic() + 120
    try:
        while not (tmp_path / "blocked").exists():  # steps 0-4 done, the checkpoint of step 3 written
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached step 4"
            time.sleep(0.05)
        saved = torch.load(state_file, weights_only=False)
        assert saved["state"]["step"] == 3  # mid-epoch (epoch 1, after its first batch)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "final.pt").exists()
    (tmp_path / "blocked").unlink()
    done = subprocess.run(argv[:5] + ["-1", argv[6]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from step 3 of 8" in done.stderr  # logged when it resumes
    _assert_same_weights(torch.load(tmp_path / "final.pt", weights_only=True), ref_state)
    result = json.loads((tmp_path / "history.json").read_text())
    assert result["resumed_from"] == 3
    assert result["seen"] == list(range(8))  # the saved steps are logged again, then the new ones
    assert result["history"] == list(ref_history)


def test_training_resumes_at_an_epoch_boundary_with_complete_history(proposer_world, uninterrupted, tmp_path):
    path, root = proposer_world
    ref_state, ref_history, _ = uninterrupted
    checkpoint = Checkpoint("train_proposer", {"run": 2}, root=tmp_path)

    torch.manual_seed(0)
    with pytest.raises(_Stop):
        train_proposer(build_model("resnet18", SIZE), path, root, device="cpu", progress=False, log_step=_stop_at(7),
                       checkpoint=checkpoint, checkpoint_every=3, **RUN)  # fmt: skip
    assert checkpoint.load()["step"] == 6  # the end of epoch 2 (2 batches per epoch)
    state, history, seen = _train(path, root, checkpoint=checkpoint, checkpoint_every=3)
    assert history.resumed_from == 6
    assert seen == list(range(8)) and len(history) == 8
    assert list(history) == list(ref_history)  # every step's losses and lr, the saved ones included
    _assert_same_weights(state, ref_state)


def test_a_checkpoint_of_another_key_is_ignored(proposer_world, uninterrupted, tmp_path):
    path, root = proposer_world
    ref_state, ref_history, _ = uninterrupted

    torch.manual_seed(0)
    with pytest.raises(_Stop):
        train_proposer(build_model("resnet18", SIZE), path, root, device="cpu", progress=False, log_step=_stop_at(2),
                       checkpoint=Checkpoint("train_proposer", {"lr": 0.5}, root=tmp_path), checkpoint_every=2,
                       **RUN)  # fmt: skip
    other = Checkpoint("train_proposer", {"lr": 0.01}, root=tmp_path)
    assert other.path.is_file() and other.load() is None  # same file, another key: not resumed from
    state, history, _ = _train(path, root, epochs=1, checkpoint=other, checkpoint_every=100)
    assert history.resumed_from == 0 and len(history) == 2
    assert list(history) == list(ref_history)[:2]  # started from scratch: the same first steps as a fresh run


def test_checkpoint_key_covers_what_changes_training():
    from stages.train_proposer import checkpoint_key

    manifest = Manifest(
        source="synthetic", train_json="t.json", val_json="v.json", image_root="img", proposer_json="p.json",
        base_category_ids=[1], files={"p.json": "abc"}, proposer_excluded_image_ids=[3, 1],
    )  # fmt: skip
    base = checkpoint_key(Params(), manifest, "cpu")
    other_grad = "torchvision" if Proposer().roi_align_grad == "sparse" else "sparse"
    assert checkpoint_key(Params(proposer=Proposer(checkpoint_every=7)), manifest, "cpu") == base
    assert checkpoint_key(Params(seed=1), manifest, "cpu") == base  # the global seed makes the data, not the training
    assert checkpoint_key(Params(), manifest, "cpu", world_size=1) == base
    assert checkpoint_key(Params(proposer=Proposer(num_workers=2)), manifest, "cpu") == base  # speed only
    changed = [
        checkpoint_key(Params(proposer=Proposer(lr=0.5)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(epochs=2)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(seed=1)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(roi_align_grad=other_grad)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(fpn_channels=64)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(rois_per_image=16)), manifest, "cpu"),
        checkpoint_key(Params(proposer=Proposer(amp="bf16")), manifest, "cpu"),
        checkpoint_key(Params(), manifest, "cpu", world_size=2),  # each rank's RNG state is saved
        checkpoint_key(Params(), manifest, "cuda"),
        checkpoint_key(Params(), Manifest(**{**manifest.__dict__, "files": {"p.json": "abd"}}), "cpu"),
        checkpoint_key(Params(), Manifest(**{**manifest.__dict__, "proposer_excluded_image_ids": [1]}), "cpu"),
        checkpoint_key(Params(), Manifest(**{**manifest.__dict__, "proposer_image_root": "coco"}), "cpu"),
    ]
    assert all(key != base for key in changed)
    threads = torch.get_num_threads()
    try:  # the CPU's thread count changes the bits: a resume under another one starts over
        torch.set_num_threads(threads + 1)
        assert checkpoint_key(Params(), manifest, "cpu") != base
    finally:
        torch.set_num_threads(threads)


def test_decoding_workers_train_the_same_weights(proposer_world, uninterrupted):
    """Workers only decode: the batch order and the augmentations are drawn in the training process."""
    path, root = proposer_world
    ref_state, ref_history, _ = uninterrupted
    state, history, seen = _train(path, root, num_workers=2)
    assert seen == list(range(8)) and list(history) == list(ref_history)
    _assert_same_weights(state, ref_state)


def test_bf16_autocast_trains_reproducibly_and_resumes(proposer_world, uninterrupted, tmp_path):
    path, root = proposer_world
    ref_state, _, _ = uninterrupted
    state, history, _ = _train(path, root, amp="bf16")
    assert len(history) == 8 and all(np.isfinite(h["loss"]) for h in history)
    assert all(v.dtype == ref_state[k].dtype for k, v in state.items())  # the weights stay float32
    assert any(not torch.equal(v, ref_state[k]) for k, v in state.items())  # bf16 arithmetic: other weights
    again, _, _ = _train(path, root, amp="bf16")
    _assert_same_weights(again, state)

    checkpoint = Checkpoint("train_proposer", {"amp": "bf16"}, root=tmp_path)

    torch.manual_seed(0)
    with pytest.raises(_Stop):
        train_proposer(build_model("resnet18", SIZE), path, root, device="cpu", progress=False, log_step=_stop_at(5),
                       checkpoint=checkpoint, checkpoint_every=3, amp="bf16", **RUN)  # fmt: skip
    resumed, history, _ = _train(path, root, amp="bf16", checkpoint=checkpoint, checkpoint_every=3)
    assert history.resumed_from == 3
    _assert_same_weights(resumed, state)


def test_fp16_autocast_scales_the_loss_and_checkpoints_the_scaler(proposer_world, tmp_path):
    path, root = proposer_world
    checkpoint = Checkpoint("train_proposer", {"amp": "fp16"}, root=tmp_path)

    torch.manual_seed(0)
    try:
        with pytest.raises(_Stop):
            train_proposer(build_model("resnet18", SIZE), path, root, device="cpu", progress=False,
                           log_step=_stop_at(2), checkpoint=checkpoint, checkpoint_every=1, amp="fp16",
                           **RUN)  # fmt: skip
    except PipelineError as err:  # a torch build without fp16 autocast on the CPU says so before any step
        assert "fp16" in str(err)
        pytest.skip(str(err))
    saved = checkpoint.load()
    assert saved["step"] == 2 and saved["scaler"]["scale"] > 0  # GradScaler's state, to resume with


@pytest.mark.parametrize(
    ("kw", "message"), [({"amp": "fp8"}, "amp must be one of"), ({"num_workers": -1}, "num_workers")]
)
def test_bad_speed_settings_are_one_line_errors(proposer_world, kw, message):
    path, root = proposer_world
    with pytest.raises(PipelineError, match=message):
        train_proposer(build_model("resnet18", SIZE), path, root, device="cpu", progress=False, **RUN, **kw)


def test_excluded_images_are_left_out(proposer_world, tmp_path):
    """LVIS val images (listed in the manifest) are never loaded: here their files do not even exist."""
    path, root = proposer_world
    data = json.loads(path.read_text())
    data["images"].append({"id": 77, "file_name": "missing/77.png", "height": SIZE, "width": SIZE})
    data["annotations"].append(
        {"id": 500, "image_id": 77, "category_id": 1, "bbox": [2, 2, 20, 20], "segmentation": [[2, 2, 22, 2, 22, 22]],
         "iscrowd": 0}
    )  # fmt: skip
    with_missing = tmp_path / "coco.json"
    with_missing.write_text(json.dumps(data))
    dataset = CocoInstances(with_missing, root, exclude_image_ids=[77, 2, 12345])
    assert len(dataset) == 5 and dataset.n_excluded == 2  # 12345 is not in the file
    assert {dataset[i][1]["image_id"] for i in range(len(dataset))} == {1, 3, 4, 5, 6}
    torch.manual_seed(0)
    history = train_proposer(build_model("resnet18", SIZE), with_missing, root, epochs=1, batch_size=3, lr=0.01,
                             seed=0, device="cpu", progress=False, exclude_image_ids=[77, 2])  # fmt: skip
    assert len(history) == 2 and history.n_images == 5 and history.n_excluded == 2
    with pytest.raises(PipelineError, match="77.png"):  # without the exclusion, the missing file is read
        train_proposer(build_model("resnet18", SIZE), with_missing, root, epochs=1, batch_size=7, lr=0.01,
                       seed=0, device="cpu", progress=False)  # fmt: skip


def test_sparse_and_torchvision_gradients_train_alike(proposer_world):
    """`roi_align_grad`: the whole model's gradient of one step is torchvision's to float rounding, and training
    with either starts from the same losses (the forward is the same)."""
    path, root = proposer_world
    data = CocoInstances(path, root)
    images, targets = (list(x) for x in zip(*(data[i] for i in range(3)), strict=True))
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE).train()
    grads = {}
    for sparse in (True, False):
        for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
            pool.sparse_grad = sparse
        torch.manual_seed(1)  # the same RoI samples
        model.zero_grad()
        sum(model(images, targets).values()).backward()
        grads[sparse] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, expected in grads[False].items():
        scale = float(expected.abs().max())
        assert (grads[True][name] - expected).abs().max() <= 1e-4 * scale + 1e-9, name
    first = {}
    for grad in ("sparse", "torchvision"):
        torch.manual_seed(0)
        model = build_model("resnet18", SIZE)
        first[grad] = train_proposer(model, path, root, epochs=1, batch_size=2, lr=0.01, seed=3, device="cpu",
                                     progress=False, roi_align_grad=grad)[0]  # fmt: skip
        assert not any(p.sparse_grad for p in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool))
    assert first["sparse"] == first["torchvision"]
    with pytest.raises(PipelineError, match="roi_align_grad"):
        train_proposer(build_model("resnet18", SIZE), path, root, epochs=1, batch_size=2, lr=0.01, seed=0,
                       device="cpu", progress=False, roi_align_grad="cuda")  # fmt: skip


def test_fpn_width_and_roi_budget(proposer_world, tmp_path):
    path, root = proposer_world
    torch.manual_seed(0)
    model = build_model("resnet18", SIZE, fpn_channels=64)
    assert model.backbone.out_channels == 64 and model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7
    train_proposer(model, path, root, epochs=1, batch_size=3, lr=0.01, seed=0, device="cpu", progress=False,
                   rois_per_image=16)  # fmt: skip
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    saved = tmp_path / "p.pt"
    save_checkpoint(model, saved, "resnet18", SIZE)
    assert torch.load(saved, weights_only=True)["fpn_channels"] == 64  # absent at 256: older files keep their bytes
    images = [_image(1)]
    loaded = load_checkpoint(saved, "resnet18", SIZE)
    for a, b in zip(propose(model, images, device="cpu"), propose(loaded, images, device="cpu"), strict=True):
        np.testing.assert_array_equal(a["masks"], b["masks"])
    with pytest.raises(PipelineError, match="resnet"):
        build_model("mobilenet_v3", SIZE, fpn_channels=64)


# --------------------------------------------------------------------------------------------------
# ranks: the global batch split, DDP under torchrun


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_global_batch_is_split_across_the_ranks(world_size):
    for m in range(1, 9):
        shares = [_share(m, r, world_size) for r in range(world_size)]
        assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(m))
        assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1
    n, batch = 11, 6  # batches of 6 and 5
    one = list(_EpochBatches(n, batch, torch.Generator().manual_seed(1)))
    per_rank = [
        list(_EpochBatches(n, batch, torch.Generator().manual_seed(1), r, world_size)) for r in range(world_size)
    ]
    for b, batch_images in enumerate(one):
        shares = [_share(len(batch_images), r, world_size) for r in range(world_size)]
        got = [per_rank[r][b] for r in range(world_size)]
        assert [i for (lo, hi), g in zip(shares, got, strict=True) if hi > lo for i in g] == batch_images
        assert all(g == batch_images[:1] for (lo, hi), g in zip(shares, got, strict=True) if hi == lo)  # placeholder


def test_the_global_batch_must_split_evenly(proposer_world):
    path, root = proposer_world
    with pytest.raises(PipelineError, match="global batch.*multiple of 2"):
        train_proposer(build_model("resnet18", SIZE), path, root, epochs=1, batch_size=3, lr=0.01, seed=0,
                       device="cpu", progress=False, ranks=Ranks(0, 2, 0))  # fmt: skip


def _torchrun_workspace(tmp_path: Path) -> Path:
    from tests.test_e2e import TINY, copy_repo

    tiny = {**TINY, "data.synthetic.n_train": 16, "data.synthetic.n_val": 4, "data.synthetic.n_categories": 8,
            "data.synthetic.max_objects": 3, "proposer.epochs": 3, "proposer.checkpoint_every": 2}  # fmt: skip
    repo = copy_repo(tmp_path / "repo", tiny, "tiny")
    done = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return repo


def test_torchrun_trains_one_model_and_a_killed_run_resumes_to_it(tmp_path):
    """`torchrun --standalone --nproc_per_node 2 -m stages.train_proposer` (gloo, CPU): DDP over the split global
    batch, rank 0 alone writes models/proposer.pt, dvclive and the summary; a 2-rank run (`dist.nproc: 2`) whose
    rank 1 is killed after a checkpoint resumes, with the same command, to the uninterrupted run's bytes."""
    from tests.test_e2e import params_with, rank_pid

    repo = _torchrun_workspace(tmp_path)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, "-m", "stages.train_proposer"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("[train_proposer]") == 1 and "with 2 ranks" in output  # rank 0's summary only
    reference = (repo / "models/proposer.pt").read_bytes()
    state = repo / "checkpoints/train_proposer/state.pt"
    assert not state.exists()  # cleared once the model is written
    metrics = json.loads((repo / "dvclive/train_proposer/metrics.json").read_text())
    steps = metrics["steps"]
    assert steps == 3 * -(-metrics["train_images"] // 4)  # 3 epochs of global batches of 4
    (repo / "models/proposer.pt").unlink()

    cmd = [sys.executable, "-m", "stages.train_proposer", "--params-file", params_with(repo, "two.yaml", dist__nproc=2)]
    with open(tmp_path / "killed.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 300
    try:
        while not state.exists():  # rank 0 saved step 2's checkpoint
            assert proc.poll() is None, (tmp_path / "killed.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        victim = rank_pid(1, repo)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=120) == 1
    finally:
        proc.kill()
    assert "rank 1 of 2 was killed by SIGKILL" in (tmp_path / "killed.txt").read_text()
    assert not (repo / "models/proposer.pt").exists()
    at = int(torch.load(state, weights_only=False)["state"]["step"])
    assert 2 <= at < steps
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"resumed from step {at} of {steps}" in done.stderr
    assert (repo / "models/proposer.pt").read_bytes() == reference
    assert not state.exists()
