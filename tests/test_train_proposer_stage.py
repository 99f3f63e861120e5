"""`stages.train_proposer`'s OpenMP spin count: a short spin for the torch it imports (what libgomp itself reports
with OMP_DISPLAY_ENV), set only where the user set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT, and not left in the
environment of the processes it starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHOW = (
    "import os, sys\n"
    "import stages.train_proposer as stage\n"
    "assert 'torch' in sys.modules\n"
    "print(stage._SHORT_SPIN, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))\n"
)


def _import_stage(**env: str) -> tuple[str, str]:
    """(what the stage leaves in os.environ, the spin count libgomp read) after importing the stage."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", SHOW],
        cwd=ROOT,
        env={**clean, **env, "OMP_DISPLAY_ENV": "VERBOSE"},  # libgomp prints its settings to stderr as it loads
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    read = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)
    if read is None:
        pytest.skip("torch's OpenMP runtime is not libgomp")
    return done.stdout.strip(), read.group(1)


@pytest.mark.parametrize(
    ("env", "left", "spin"),
    [
        ({}, "True None None", "3000"),  # set for torch's libgomp, then removed
        ({"GOMP_SPINCOUNT": "500"}, "False 500 None", "500"),  # the user's value wins
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "False None PASSIVE", "0"),  # the user's policy keeps its own spin count
    ],
)
def test_short_spin_only_where_the_user_chose_nothing(env, left, spin):
    assert _import_stage(**env) == (left, spin)
