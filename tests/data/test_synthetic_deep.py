"""Unit tests for the deeper synthetic world (`data.synthetic.hierarchy: deep`, `pipeline.data.synthetic_deep`)
and for the flat world staying as it was.

A small deep world (60 train / 20 val images, 16 categories) is generated once per module; the default-size
long-tail plan is tested on the design and plan alone, without rendering.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import yaml

from pipeline.config import parse_params
from pipeline.data.synthetic import (
    COMMON_MAX,
    RARE_MAX,
    WorldSpec,
    design_deep_world,
    design_world,
    generate_world,
    plan_split,
    split_targets,
)
from pipeline.data.synthetic_deep import LEVEL_NAMES
from pipeline.data.synthetic_render import SUBPART_MIN_AREA
from pipeline.errors import PipelineError

DEEP = WorldSpec(n_train=60, n_val=20, n_categories=16, hierarchy="deep")
SPLITS = ("train", "val")


@dataclass
class Deep:
    root: Path
    summary: dict
    world: dict
    lvis: dict[str, dict]
    coco_base: dict

    def cats(self) -> dict[int, dict]:
        return {c["id"]: c for c in self.world["categories"]}

    def anns(self, split: str) -> dict[int, dict]:
        return {a["id"]: a for a in self.lvis[split]["annotations"]}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _decode(ann: dict) -> np.ndarray:
    rle = dict(ann["segmentation"])
    rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bucket(n_images: int) -> str:
    return "r" if n_images <= RARE_MAX else "c" if n_images <= COMMON_MAX else "f"


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Deep:
    root = tmp_path_factory.mktemp("deep_world")
    summary = generate_world(DEEP, root, progress=False)
    return Deep(
        root=root,
        summary=summary,
        world=_load(root / "world.json"),
        lvis={s: _load(root / f"lvis_v1_{s}.json") for s in SPLITS},
        coco_base=_load(root / "coco_base_train.json"),
    )


# ---------------------------------------------------------------------------------------------- levels


def test_the_deep_world_has_three_levels(deep: Deep) -> None:
    assert deep.world["spec"] == asdict(DEEP)
    cats = deep.cats()
    assert {c["level"] for c in cats.values()} == {0, 1, 2}
    for split in SPLITS:
        level = {a["id"]: cats[a["category_id"]]["level"] for a in deep.lvis[split]["annotations"]}
        parent_of = {child: parent for parent, child in deep.world["relations"][split]}
        grandchildren = [a for a in parent_of if parent_of[a] in parent_of]
        assert grandchildren, f"{split}: no annotation whose parent has a parent"
        for child in grandchildren:
            assert (level[parent_of[parent_of[child]]], level[parent_of[child]], level[child]) == (0, 1, 2)
        # the transitive pairs are exactly the (object, sub-part) compositions of the direct ones
        assert sorted(deep.world["relations_transitive"][split]) == sorted(
            [parent_of[parent_of[c]], c] for c in grandchildren
        )
        counts = Counter(level.values())
        assert deep.summary["n_instances_by_level"][split] == {n: counts[lv] for lv, n in enumerate(LEVEL_NAMES)}
        assert sum(deep.summary["n_relations_by_level"][split].values()) == len(deep.world["relations"][split])


def test_relations_follow_the_declared_structure(deep: Deep) -> None:
    cats = deep.cats()
    for c in cats.values():
        assert all(cats[p]["level"] == c["level"] - 1 for p in c["parent_ids"]), c["name"]
        assert bool(c["parent_ids"]) == (c["level"] > 0) == c["is_part"]
        assert all(cats[k]["level"] == c["level"] + 1 for k in c["child_ids"])
    for split in SPLITS:
        anns = deep.anns(split)
        children: set[int] = set()
        for parent_id, child_id in deep.world["relations"][split]:
            parent, child = anns[parent_id], anns[child_id]
            assert parent["image_id"] == child["image_id"]
            assert parent["category_id"] in cats[child["category_id"]]["parent_ids"]
            assert child_id not in children, "an instance has two parents"
            children.add(child_id)
        # every part and sub-part instance has its parent, objects have none
        assert children == {a["id"] for a in anns.values() if cats[a["category_id"]]["level"] > 0}


def test_child_masks_lie_inside_their_parent_masks(deep: Deep) -> None:
    """Visible masks: a sub-part's inside its part's, a part's (sub-parts' pixels included) inside its object's."""
    cats = deep.cats()
    for split in SPLITS:
        anns = deep.anns(split)
        decoded: dict[int, np.ndarray] = {}
        pairs = deep.world["relations"][split] + deep.world["relations_transitive"][split]
        for parent_id, child_id in pairs:
            for i in (parent_id, child_id):
                if i not in decoded:
                    decoded[i] = _decode(anns[i])
            parent, child = decoded[parent_id], decoded[child_id]
            assert child.any() and not (child & ~parent).any(), f"{split}: {child_id} leaves parent {parent_id}"
            assert parent.sum() > child.sum()
        for a in anns.values():  # sub-parts are legible: at least SUBPART_MIN_AREA pixels at image_size 128
            if cats[a["category_id"]]["level"] == 2:
                assert a["area"] >= SUBPART_MIN_AREA


def test_children_are_rarer_and_only_appear_inside_their_parents(deep: Deep) -> None:
    cats = deep.cats()
    for c in cats.values():
        for p in c["parent_ids"]:
            assert c["planned_rank"] > cats[p]["planned_rank"]
        if c["parent_ids"]:
            assert c["image_count"]["train"] <= sum(cats[p]["image_count"]["train"] for p in c["parent_ids"])


# ---------------------------------------------------------------------------------------------- super-categories


def test_super_categories_are_shape_families(deep: Deep) -> None:
    cats = deep.cats()
    families = deep.world["families"]
    assert len(families) >= 4
    assert sorted(i for f in families for i in f["category_ids"]) == sorted(cats), "a category in no or two families"
    assert len({f["shape"] for f in families}) == len(families), "two families share an outline shape"
    for f in families:
        members = [cats[i] for i in f["category_ids"]]
        assert {c["shape"] for c in members} == {f["shape"]}
        assert {c["level"] for c in members} == {f["level"]}
        assert {c["supercategory"] for c in members} == {f["name"]}
        looks = [(c["colour"], c["texture"]) for c in members]
        assert len(set(looks)) == len(looks), "two categories of one family look the same"
    assert sum(len(f["category_ids"]) >= 2 for f in families if f["level"] == 0) >= 2
    for split in SPLITS:  # LVIS (and the COCO base file) carry the super-category
        for c in deep.lvis[split]["categories"]:
            assert c["supercategory"] == cats[c["id"]]["supercategory"]
    for c in deep.coco_base["categories"]:
        assert c["supercategory"] == cats[c["id"]]["supercategory"]


def test_a_child_stands_out_from_its_parents(deep: Deep) -> None:
    cats = deep.cats()
    for c in cats.values():
        for p in c["parent_ids"]:
            assert c["colour"] not in (cats[p]["colour"], cats[p]["colour2"]), f"{c['name']} in {cats[p]['name']}"
            assert c["shape"] != cats[p]["shape"]


# ---------------------------------------------------------------------------------------------- long tail


def test_every_category_has_train_and_val_instances(deep: Deep) -> None:
    for split in SPLITS:
        present = {a["category_id"] for a in deep.lvis[split]["annotations"]}
        assert present == set(deep.cats()), f"{split}: categories without instances"
    assert deep.summary["categories_missing_in_val"] == []


def test_base_categories_follow_the_flat_rule(deep: Deep) -> None:
    cats = deep.cats()
    counts = {c["id"]: c["image_count"] for c in deep.lvis["train"]["categories"]}
    frequent = {i for i, c in cats.items() if c["frequency"] == "f"}
    common = sorted((i for i, c in cats.items() if c["frequency"] == "c"), key=lambda i: (-counts[i], i))
    assert set(deep.summary["base_category_ids"]) == frequent | set(common[::2])
    assert all(cats[i]["frequency"] != "r" for i in deep.summary["base_category_ids"])


def test_default_size_plan_fills_every_bucket() -> None:
    """The default-size deep world's plan (design and placement plan, no rendering): >= 5 categories in each
    LVIS bucket, all three levels present, parts and sub-parts in more than one bucket, val for everyone."""
    spec = WorldSpec(hierarchy="deep")
    cats, layouts = design_deep_world(spec)
    targets = split_targets(spec, len(cats))
    images: dict[str, dict[int, int]] = {}
    for s_idx, (split, n) in enumerate((("train", spec.n_train), ("val", spec.n_val))):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 2, s_idx])))
        held: dict[int, set[int]] = defaultdict(set)
        for i, (tops, parts, subs) in enumerate(plan_split(spec, cats, n, targets[split], rng)):
            for r in tops + [r for rs in parts.values() for r in rs] + [r for rs in subs.values() for r in rs]:
                held[r].add(i)
        images[split] = {c.rank: len(held[c.rank]) for c in cats}
    buckets = Counter(_bucket(n) for n in images["train"].values())
    assert all(buckets[b] >= 5 for b in "rcf"), dict(buckets)
    assert all(n >= 1 for n in images["val"].values()), "a category has no planned val image"
    levels = Counter(c.level for c in cats)
    assert levels[1] >= 5 and levels[2] >= 3, levels
    for level in (1, 2):
        assert len({_bucket(images["train"][c.rank]) for c in cats if c.level == level}) >= 2
    # every sub-part sits in a part that sits in an object, each at a layout slot of its parent
    for c in cats:
        for p in c.parents:
            assert cats[p - 1].level == c.level - 1 and c.rank in {lay.part for lay in layouts[p]}


# ---------------------------------------------------------------------------------------------- determinism, flat


def test_same_deep_spec_gives_byte_identical_files(deep: Deep, tmp_path: Path) -> None:
    again = generate_world(DEEP, tmp_path / "again", progress=False)
    assert again == deep.summary
    fa, fb = _files(deep.root), _files(tmp_path / "again")
    assert set(fa) == set(fb)
    assert [name for name in fa if fa[name] != fb[name]] == []


def test_flat_is_the_default_and_writes_no_deep_fields(tmp_path: Path) -> None:
    small = WorldSpec(n_train=30, n_val=10, image_size=64, n_categories=12, max_objects=4, seed=3)
    assert small.hierarchy == "flat" and replace(small, hierarchy="flat") == small
    summary = generate_world(replace(small, hierarchy="flat"), tmp_path / "flat", progress=False)
    assert "levels" not in summary
    world = _load(tmp_path / "flat" / "world.json")
    assert "hierarchy" not in world["spec"] and "families" not in world and "relations_transitive" not in world
    assert all("level" not in c and "supercategory" not in c for c in world["categories"])
    lvis = _load(tmp_path / "flat" / "lvis_v1_train.json")
    assert all("supercategory" not in c for c in lvis["categories"])
    coco = _load(tmp_path / "flat" / "coco_base_train.json")
    assert {c["supercategory"] for c in coco["categories"]} == {"shape"}


# sha256 of the default flat world's design and placement plan, computed with the module as it was before
# the deep option (same value after): the flat world's categories, layouts and per-image plans are unchanged.
FLAT_DEFAULT_PLAN_SHA256 = "a504508bc815dcbe691d356b76021ada2d9472b8bdf0f6c7c7a84e7b552f30c2"


def test_flat_design_and_plan_are_unchanged() -> None:
    spec = WorldSpec()
    cats, layouts = design_world(spec)
    design = [[c.rank, c.id, c.name, c.colour2, c.parents, round(c.size, 9), round(c.tex_freq, 9)] for c in cats]
    lay = {str(k): [[x.part, x.slots, x.rel_size] for x in v] for k, v in sorted(layouts.items())}
    targets = split_targets(spec, len(cats))
    plans = []
    for s_idx, (split, n) in enumerate((("train", spec.n_train), ("val", spec.n_val))):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, 2, s_idx])))
        plan = plan_split(spec, cats, n, targets[split], rng)
        assert all(subs == {} for _, _, subs in plan)
        plans.append([[tops, {str(k): v for k, v in parts.items()}] for tops, parts, _ in plan])
    blob = json.dumps([design, lay, plans], sort_keys=True, default=int)
    assert hashlib.sha256(blob.encode()).hexdigest() == FLAT_DEFAULT_PLAN_SHA256


def test_bad_hierarchy_raises_a_one_line_pipeline_error(tmp_path: Path) -> None:
    out = tmp_path / "world"
    with pytest.raises(PipelineError, match=re.escape("hierarchy must be one of flat | deep")) as info:
        generate_world(replace(DEEP, hierarchy="tree"), out, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_params_take_the_hierarchy() -> None:
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    assert data["data"]["synthetic"]["hierarchy"] == "flat"
    data["data"]["synthetic"]["hierarchy"] = "deep"
    assert parse_params(data).data.synthetic.hierarchy == "deep"
    data["data"]["synthetic"]["hierarchy"] = "tree"
    with pytest.raises(PipelineError, match=r"data\.synthetic\.hierarchy"):
        parse_params(data)
