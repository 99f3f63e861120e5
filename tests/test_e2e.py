"""End to end: `dvc repro` on a tiny configuration in a temporary copy of the repository.

Proves the DAG runs, that a second `dvc repro` runs nothing, and that a param change re-runs only
the stages downstream of the stage that reads it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TINY = {
    "data.synthetic.n_train": 24,
    "data.synthetic.n_val": 8,
    "data.synthetic.image_size": 64,
    "data.synthetic.n_categories": 16,
    "data.synthetic.max_objects": 4,
    "proposer.image_size": 64,
    "proposer.epochs": 1,
    "proposer.batch_size": 4,
    "propose.score_thresh": 0.05,
    "sample.crop_size": 32,
    "embed.dim": 8,
    "embed.hidden": 32,
    "embed.epochs": 2,
    "embed.batch_size": 64,
    "cluster.k_range": [4, 16, 4],
    "device": "cpu",
}
STAGES = {
    "prepare",
    "train_proposer",
    "propose@train",
    "propose@val",
    "sample@train",
    "sample@val",
    "embed",
    "cluster",
    "evaluate",
}


def set_key(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        params = params[key]
    assert leaf in params, dotted
    params[leaf] = value


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


SKIP = ("data/", "models/", "metrics/", "plots/", "dvclive/", "checkpoints/")


def copy_repo(dest: Path, params_set: dict, message: str) -> Path:
    """The repository's tracked and untracked-not-ignored files (no outputs) copied to `dest`, with the params
    in `params_set` (dotted keys) changed, as a fresh git repository with one commit (dvclive wants a commit)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file() and not name.startswith(SKIP):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for key, value in params_set.items():
        set_key(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], dest)
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("e2e") / "repo", TINY, "tiny")


@pytest.fixture(scope="module")
def first_run(repo) -> str:
    return run([str(BIN / "dvc"), "repro"], repo)


@pytest.mark.e2e
def test_repro_runs_every_stage(repo, first_run):
    assert ran_stages(first_run) == STAGES
    import zarr

    for split in ("train", "val"):
        group = zarr.open_group(str(repo / "data" / split / "proposals.zarr"), mode="r")
        offsets = np.asarray(group["image_offsets"][...])
        assert offsets[0] == 0 and offsets[-1] == group["boxes"].shape[0] == group["masks"].shape[0]
        assert len(offsets) == group["image_ids"].shape[0] + 1
        assert group.attrs["kind"] == "proposals" and group.attrs["split"] == split
    assert (repo / "plots" / "prepare" / "preview.png").stat().st_size > 1000
    assert (repo / "metrics" / "propose_val.json").is_file()
    samples = zarr.open_group(str(repo / "data" / "val" / "samples.zarr"), mode="r")
    n = group["boxes"].shape[0]
    assert samples["features/box"].shape[0] == samples["features/bg"].shape[0] == n
    assert samples.attrs["source_fingerprint"] == group.attrs["fingerprint"]
    embeddings = np.asarray(zarr.open_group(str(repo / "data/val/embeddings.zarr"), mode="r")["embeddings"][...])
    assert embeddings.shape == (n, 8) and (np.linalg.norm(embeddings, axis=1) < 1).all()
    clusters = zarr.open_group(str(repo / "data/val/clusters.zarr"), mode="r")
    assert clusters["assignment"].shape == (n,) and clusters.attrs["K"] in (4, 8, 12, 16)
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    for row in ("majority", "hungarian", "oracle"):
        assert 0.0 <= metrics[row]["AP"] <= 1.0
    assert metrics["oracle"]["AP"] >= metrics["hungarian"]["AP"]
    for picture in ("evaluate/poincare_disk.png", "evaluate/ap_by_bucket.png", "cluster/elbow.png"):
        assert (repo / "plots" / picture).stat().st_size > 1000
    curve = (repo / "dvclive/train_proposer/plots/metrics/train/loss.tsv").read_text().split()
    steps = [int(v) for v in curve[2::2]]  # header "step loss", then step/value rows
    trained = json.loads((repo / "dvclive/train_proposer/metrics.json").read_text())["steps"]
    assert steps == list(range(0, trained, 5))  # x is the training step (a point every 5 steps)


@pytest.mark.e2e
def test_second_repro_runs_nothing(repo, first_run):
    output = run([str(BIN / "dvc"), "repro"], repo)
    assert ran_stages(output) == set(), output
    # the default DAG (baselines/dvc.yaml is run only by `make tables`)
    assert "up to date" in run([str(BIN / "dvc"), "status", "dvc.yaml"], repo)


def lock_outs(repo: Path) -> dict[str, str]:
    """Every output's hash in dvc.lock (md5 of a file, or of a directory's listing)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_stores_do_not_depend_on_the_commit(repo, first_run):
    """A commit that changes no stage's code or params re-runs nothing; forced re-runs at the new commit give
    byte-identical stores and models (nothing in them records the commit or the clock)."""
    before = lock_outs(repo)
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nanother commit\n")
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "docs only"], repo)
    assert ran_stages(run([str(BIN / "dvc"), "repro"], repo)) == set()
    output = run([str(BIN / "dvc"), "repro", "-f"], repo)
    assert ran_stages(output) == STAGES
    after = lock_outs(repo)
    assert after == before, {path: (before.get(path), md5) for path, md5 in after.items() if before.get(path) != md5}


@pytest.mark.e2e
def test_killed_propose_resumes_from_its_last_part(repo, first_run):
    """SIGKILL `propose` after some parts of images are saved: the rerun computes only the missing parts, leaves
    no temporary folder, and writes the same store as the uninterrupted run."""
    import signal
    import time

    store = repo / "data" / "train" / "proposals.zarr"
    original = tree_bytes(store)
    cmd = [str(BIN / "python"), "-m", "stages.propose", "--split", "train", "--images-per-part", "2"]
    run(cmd, repo)  # uninterrupted, with the same parts (batches never span two parts)
    reference = tree_bytes(store)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    work = store.parent / ".proposals.zarr.parts"
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("part-*/done"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("part-*/done")))
    assert 3 <= done < 12, f"{done} parts were done when killed"
    output = run(cmd, repo)
    assert f"resuming: {done} of 12 parts already done" in output
    assert tree_bytes(store) == reference
    assert sorted(p.name for p in store.parent.iterdir() if p.name.startswith(".")) == []
    run(cmd[:-2], repo)  # back to the default parts: the store dvc.lock knows
    assert tree_bytes(store) == original


@pytest.mark.e2e
def test_param_change_reruns_only_downstream(repo, first_run):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["propose"]["batch_size"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run([str(BIN / "dvc"), "repro"], repo)
    ran = ran_stages(output)
    # propose re-runs; upstream stages are untouched (downstream ones run only if the proposals changed)
    assert {"propose@train", "propose@val"} <= ran and not ran & {"prepare", "train_proposer"}, output


@pytest.mark.e2e
def test_loss_ablation_reruns_only_embed_and_after(repo, first_run):
    """`dvc exp run -S loss.hier=0`: the ablation of the paper's Table 2 re-runs embed, cluster, evaluate only."""
    output = run([str(BIN / "dvc"), "exp", "run", "-S", "loss.hier=0"], repo)
    assert ran_stages(output) == {"embed", "cluster", "evaluate"}, output


@pytest.mark.e2e
def test_inspect_prints_and_renders(repo, first_run):
    store = repo / "data" / "val" / "proposals.zarr"
    import zarr

    image_id = int(zarr.open_group(str(store), mode="r")["image_ids"][0])
    output = run([str(BIN / "python"), "-m", "stages.inspect", str(store), "--render", str(image_id)], repo)
    assert "image_offsets" in output and "masks" in output and "chunks" in output
    assert (repo / "plots" / "inspect" / f"{image_id}.png").stat().st_size > 1000


def params_with(repo: Path, name: str, **dotted) -> str:
    """A params file `name` in `repo`: its params.yaml with `dotted` keys changed (dvc's params stay as they are)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in dotted.items():
        set_key(params, key.replace("__", "."), value)
    (repo / name).write_text(yaml.safe_dump(params, sort_keys=False))
    return name


def rank_pid(rank: int, cwd: Path) -> int | None:
    """The pid of torchrun's rank `rank` working in `cwd` (read from /proc), or None."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            ours = f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env)
            if ours and os.readlink(proc / "cwd") == str(cwd):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["propose", "sample"])
def test_dist_nproc_shards_by_parts_into_the_same_store(repo, first_run, stage):
    """`dist.nproc: 2`: the stage runs itself as 2 torchrun ranks (gloo, CPU), each taking every other part of
    images, rank 0 assembling; the store has the bytes of the one-process run, with no temporary folder left."""
    kind = "proposals" if stage == "propose" else "samples"
    store = repo / "data" / "train" / f"{kind}.zarr"
    args = [str(BIN / "python"), "-m", f"stages.{stage}", "--split", "train", "--images-per-part", "3"]
    run(args, repo)  # one process, the same parts
    reference = tree_bytes(store)
    two = params_with(repo, "dist2.yaml", dist__nproc=2)
    output = run([*args, "--params-file", two], repo)
    assert output.count(f"[{stage}] train:") == 1  # one summary line: rank 0's
    assert tree_bytes(store) == reference
    assert sorted(p.name for p in store.parent.iterdir() if p.name.startswith(".")) == []
    run(args[:-2], repo)  # back to the default parts: the store dvc.lock knows


@pytest.mark.e2e
def test_a_dying_rank_fails_the_run_in_one_line_and_the_rerun_resumes(repo, first_run):
    """SIGKILL rank 1 of a 2-rank `propose`: the launch stops the other rank and fails with one line naming the
    rank; the same command then resumes from the parts both ranks had finished and ends with the same store."""
    import signal
    import time

    store = repo / "data" / "train" / "proposals.zarr"
    cmd = [str(BIN / "python"), "-m", "stages.propose", "--split", "train", "--images-per-part", "2"]
    run(cmd, repo)
    reference = tree_bytes(store)
    cmd += ["--params-file", params_with(repo, "dist2.yaml", dist__nproc=2)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    work = store.parent / ".proposals.zarr.parts"
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(work.glob("part-*/done"))) < 2:
        time.sleep(0.02)
    victim = rank_pid(1, repo)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    errors = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]
    assert errors == [
        "error: stages.propose: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped. What the ranks "
        "finished is kept: run the same command again to resume"
    ], stderr[-3000:]
    assert "Traceback" not in stderr
    done = len(list(work.glob("part-*/done")))
    assert 2 <= done < 12
    output = run(cmd, repo)
    assert "resuming:" in output and "parts already done" in output
    assert tree_bytes(store) == reference
    run(cmd[:-4], repo)  # back to the default parts: the store dvc.lock knows
