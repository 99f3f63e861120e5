"""Running DVC experiments for the reports (`make tables`, `make sweep`): not a pipeline stage."""

from __future__ import annotations

import re
import subprocess
import time

from pipeline.errors import PipelineError
from pipeline.experiments.report import Experiment


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run `tool args...`; a non-zero exit is a PipelineError quoting the last line it printed."""
    done = subprocess.run([tool, *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["(no output)"]
        raise PipelineError(f"{tool} {' '.join(args)} failed: {tail[0]}")
    return done


def dvc(*args: str) -> str:
    done = _run("dvc", *args)
    return done.stdout + done.stderr


def git(*args: str) -> str:
    return _run("git", *args).stdout.strip()


def run_experiment(exp: Experiment) -> tuple[list[str], float]:
    """Run one experiment; return the stages that ran (not restored from the cache) and the seconds it took."""
    subprocess.run(["dvc", "exp", "remove", exp.name], capture_output=True)  # an earlier run of the same row
    start = time.perf_counter()
    output = dvc("exp", "run", "--temp", "-n", exp.name, *exp.set_args())
    return re.findall(r"Running stage '([^']+)'", output), time.perf_counter() - start
