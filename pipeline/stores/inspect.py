"""Describe any Zarr store of the pipeline: tree, shapes, dtypes, chunks, shards, attrs, statistics."""

from __future__ import annotations

import json

import numpy as np
import zarr

STATS_SAMPLE = 2_000_000  # elements read for the statistics of one array


def _stats(array: zarr.Array) -> str:
    if array.size == 0:
        return "empty"
    flat = np.asarray(array[...]).reshape(-1)[:STATS_SAMPLE]
    if flat.dtype.kind in "biuf":
        values = flat.astype(np.float64)
        finite = np.isfinite(values)
        text = f"min {values[finite].min():.4g} max {values[finite].max():.4g} mean {values[finite].mean():.4g}"
        if not finite.all():
            text += f" non-finite {int((~finite).sum())}"
        return text
    return f"{len(np.unique(flat))} distinct"


def describe(group: zarr.Group, stats: bool = True) -> str:
    """A readable multi-line description of a store."""
    lines = [f"store {group.store}", "attrs:"]
    for line in json.dumps(dict(group.attrs), indent=2, sort_keys=True).splitlines():
        lines.append("  " + line)
    lines.append("arrays:")
    for path, array in sorted(_walk(group)):
        shards = f" shards {array.shards}" if array.shards else ""
        text = f"  {path:<22} {str(array.shape):<18} {str(array.dtype):<8} chunks {array.chunks}{shards}"
        if stats:
            text += f"  [{_stats(array)}]"
        lines.append(text)
    return "\n".join(lines)


def _walk(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    found = []
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            found.extend(_walk(member, path + "/"))
        else:
            found.append((path, member))
    return found
