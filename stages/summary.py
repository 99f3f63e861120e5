"""summary: what each stage produced, read back from the stores and metrics (run by `make repro`)."""

from __future__ import annotations

import json
from pathlib import Path

import zarr

from pipeline.evaluation.evaluate import metrics_table
from stages.common import MANIFEST, PROPOSER_CHECKPOINT

STORES = ("proposals", "samples", "embeddings", "clusters")


def _line(name: str, text: str) -> None:
    print(f"  {name:<16} {text}")


def main() -> None:
    print("pipeline summary")
    if MANIFEST.is_file():
        m = json.loads(MANIFEST.read_text())
        _line("prepare", f"{m['source']} dataset, {len(m['base_category_ids'])} base categories ({MANIFEST})")
    if PROPOSER_CHECKPOINT.is_file():
        live = Path("dvclive/train_proposer/metrics.json")
        extra = json.loads(live.read_text()) if live.is_file() else {}
        trained = (
            f", {extra['steps']} steps, final loss {extra['final_loss']:.3f}"
            if {"steps", "final_loss"} <= extra.keys()
            else ""
        )
        _line("train_proposer", f"{PROPOSER_CHECKPOINT} ({PROPOSER_CHECKPOINT.stat().st_size / 1e6:.1f} MB{trained})")
    for split in ("train", "val"):
        for kind in STORES:
            path = Path("data") / split / f"{kind}.zarr"
            if (path / "zarr.json").is_file():
                attrs = dict(zarr.open_group(str(path), mode="r").attrs)
                _line(kind, f"{split}: {attrs.get('counts', {})} ({path})")
        metrics = Path("metrics") / f"propose_{split}.json"
        if metrics.is_file():
            values = json.loads(metrics.read_text())
            shown = {k: round(v, 3) for k, v in values.items() if isinstance(v, float)}
            _line("proposal quality", f"{split}: {shown}")

    evaluation = Path("metrics/eval.json")
    if evaluation.is_file():
        metrics = json.loads(evaluation.read_text())
        clusters = metrics.get("clusters", {})
        _line("evaluate", f"val, k = {clusters.get('K')} ({clusters.get('k_choice')}), {clusters.get('geometry')}")
        print(metrics_table(metrics))
        quality = metrics["clustering"]["all"]
        print(
            f"clustering of matched proposals: NMI {quality['nmi']:.3f}, ARI {quality['ari']:.3f}, "
            f"purity {quality['purity']:.3f} (n = {quality['n']})"
        )


if __name__ == "__main__":
    main()
