"""What every stage shares: params loading, one-line errors, timing and the final summary line."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Params, load_params
from pipeline.data.annotation_stream import load_image_records
from pipeline.data.dataset import Manifest
from pipeline.data.lvis_format import image_path, load_image
from pipeline.errors import PipelineError

PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "dataset.json"
PROPOSER_CHECKPOINT = Path("models/proposer.pt")
EMBEDDER_CHECKPOINT = Path("models/embedder.pt")


def split_dir(split: str) -> Path:
    return Path("data") / split


def params(path: str = "params.yaml") -> Params:
    return load_params(path)


def clean_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a PipelineError into one line on stderr and exit status 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        try:
            return func(*args, **kwargs)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


class Timer:
    """Wall time of a stage, for its summary line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def summary(stage: str, text: str, timer: Timer) -> None:
    """The one-line summary a stage prints when it ends."""
    print(f"[{stage}] {text} in {timer.seconds:.1f}s", flush=True)


def image_loader(manifest: Manifest, split: str, image_ids: np.ndarray) -> Callable[[int], np.ndarray]:
    """`load(i)`: the pixels of image `image_ids[i]` of `split`, read through the manifest's annotations.

    Split images resolve under manifest.image_root with `image_path`: real LVIS v1 records through their
    coco_url (<image_root>/train2017/... or val2017/...), the synthetic world through its file_name. The
    proposer's COCO images are not split images; they live under `manifest.proposer_images()`.
    """
    gt_path = manifest.split_json(split)
    records = {int(r["id"]): r for r in load_image_records(gt_path, "LVIS annotations")}
    missing = [int(i) for i in image_ids if int(i) not in records]
    if missing:
        raise PipelineError(f"{gt_path}: image id {missing[0]} of the proposals store is not in this file")
    root = Path(manifest.image_root)

    def load(i: int) -> np.ndarray:
        return load_image(image_path(records[int(image_ids[i])], root))

    return load
