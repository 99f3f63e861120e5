"""The dataset manifest: where a run's annotations and images live, written by `prepare`.

Downstream stages never look at params.data; they read data/prepared/dataset.json, which names the
LVIS-format train/val files, the image root, the COCO-format file the proposer trains on, and the
base (seen) categories. The embedded world lives inside data/prepared/world; real LVIS is referenced
in place (nothing is copied) and fingerprinted by size and modification time.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Manifest:
    source: str
    train_json: str
    val_json: str
    image_root: str
    proposer_json: str
    base_category_ids: list[int]
    files: dict[str, str]  # path -> content digest, so a changed input changes the manifest (and only then)
    proposer_image_root: str = ""  # folder of the proposer file's file_names ("" means image_root)
    proposer_excluded_image_ids: list[int] = field(default_factory=list)  # images the proposer must not train on

    def proposer_images(self) -> Path:
        """Where the proposer file's images live (COCO: <image_root>/train2017 by default)."""
        return Path(self.proposer_image_root or self.image_root)

    def split_json(self, split: str) -> Path:
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return Path(self.train_json if split == "train" else self.val_json)


def write_manifest(path: Path, manifest: Manifest) -> None:
    path.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")


def read_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise PipelineError(f"{path}: dataset manifest not found (run the prepare stage first)")
    try:
        return Manifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise PipelineError(f"{path}: not a dataset manifest ({err})") from None


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def base_categories_by_name(lvis_categories: list[dict], coco_categories: list[dict]) -> list[int]:
    """LVIS category ids whose name or a synonym matches a COCO category name ('traffic light' ~ 'traffic_light').

    LVIS and COCO share no ids; matching names is the documented approximation of "the COCO categories".
    """
    coco_names = {_normalise(c["name"]) for c in coco_categories}
    base = []
    for cat in lvis_categories:
        names = {_normalise(cat["name"]), *(_normalise(s) for s in cat.get("synonyms", []))}
        if names & coco_names:
            base.append(int(cat["id"]))
    return sorted(base)
