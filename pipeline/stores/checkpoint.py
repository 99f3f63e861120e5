"""Resumable training state: one checkpoint file per stage under checkpoints/, keyed by what the run depends on.

`checkpoints/` is neither tracked by git nor an output of any DVC stage, so DVC never deletes it
between runs: a stage killed mid-training finds its last checkpoint on the next `dvc repro` and goes on
from there. A checkpoint records a digest of its `key` (params, input fingerprints): one written by a
run with other params or inputs is ignored, never resumed from. A stage clears its checkpoint once
its final outputs are written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.stores.store import torch_bytes, write_bytes

CHECKPOINTS = Path("checkpoints")
log = logging.getLogger(__name__)


def key_digest(key: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able mapping (sorted keys): what a checkpoint must have been made from."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """torch's global CPU (and CUDA, when present) RNG states, for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint:
    """`checkpoints/<stage>/state.pt`: save, load (only when made from the same key), clear."""

    def __init__(self, stage: str, key: Mapping[str, Any], root: Path | str = CHECKPOINTS) -> None:
        self.path = Path(root) / stage / "state.pt"
        self.digest = key_digest(key)

    def save(self, state: Mapping[str, Any]) -> None:
        """Write `state` (torch-serialisable) atomically: a kill mid-save leaves the previous checkpoint."""
        write_bytes(self.path, torch_bytes({"key": self.digest, "state": dict(state)}))

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The saved state, or None when there is none or it was made with another key (then it is removed)."""
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(io.BytesIO(self.path.read_bytes()), map_location=map_location, weights_only=False)
        except Exception as err:  # a damaged file is not worth a crash: start over
            log.warning("%s: unreadable checkpoint (%s); starting from scratch", self.path, type(err).__name__)
            self.clear()
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.digest:
            log.warning("%s: checkpoint of another run (params or inputs changed); starting from scratch", self.path)
            self.clear()
            return None
        return saved["state"]

    def clear(self) -> None:
        """Remove the checkpoint (called once the stage's outputs are written)."""
        self.path.unlink(missing_ok=True)
