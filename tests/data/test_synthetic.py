"""Unit tests for the embedded synthetic LVIS-format long-tail world (`pipeline.data.synthetic`).

The default world (WorldSpec() defaults) is generated once per session by a module-scoped fixture; the
determinism and bad-spec tests use small specs of their own.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from pipeline.data.synthetic import COMMON_MAX, RARE_MAX, WorldSpec, generate_world
from pipeline.errors import PipelineError

SMALL = WorldSpec(n_train=30, n_val=10, image_size=64, n_categories=12, max_objects=4, seed=3)
DEFAULT_GENERATION_BUDGET_S = 40.0  # the default world takes ~3 s on 2 CPU cores; fail only if far slower


@dataclass
class World:
    root: Path
    summary: dict
    seconds: float
    world: dict
    lvis: dict[str, dict]  # split -> the raw LVIS json
    coco_base: dict


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("default_world")
    start = time.perf_counter()
    summary = generate_world(WorldSpec(), root, progress=False)
    seconds = time.perf_counter() - start
    print(f"\ndefault synthetic world generated in {seconds:.2f} s; buckets {summary['buckets']}")
    return World(
        root=root,
        summary=summary,
        seconds=seconds,
        world=_load(root / "world.json"),
        lvis={s: _load(root / f"lvis_v1_{s}.json") for s in ("train", "val")},
        coco_base=_load(root / "coco_base_train.json"),
    )


def _bucket(n_images: int) -> str:
    return "r" if n_images <= RARE_MAX else "c" if n_images <= COMMON_MAX else "f"


def _train_image_counts(world: World) -> dict[int, int]:
    images: dict[int, set[int]] = defaultdict(set)
    for a in world.lvis["train"]["annotations"]:
        images[a["category_id"]].add(a["image_id"])
    return {c["id"]: len(images[c["id"]]) for c in world.lvis["train"]["categories"]}


def _decode(ann: dict) -> np.ndarray:
    rle = dict(ann["segmentation"])
    rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


# ---------------------------------------------------------------------------------------------- generation


def test_default_world_generates_quickly_and_summarises(world: World) -> None:
    spec = WorldSpec()
    assert world.seconds < DEFAULT_GENERATION_BUDGET_S, f"default world took {world.seconds:.1f} s"
    s = world.summary
    assert s["n_images"] == {"train": spec.n_train, "val": spec.n_val}
    assert s["n_categories"] == spec.n_categories
    assert sum(s["buckets"].values()) == spec.n_categories
    assert s["n_instances"] == {sp: len(world.lvis[sp]["annotations"]) for sp in ("train", "val")}
    # the flat world's world.json records no `hierarchy` (its files are as before the deep option existed)
    assert world.world["spec"] == {k: v for k, v in asdict(spec).items() if k != "hierarchy"}
    for split, n in s["n_images"].items():
        pngs = sorted((world.root / "images" / split).glob("*.png"))
        assert len(pngs) == n == len(world.lvis[split]["images"])


def test_images_match_their_records(world: World) -> None:
    size = WorldSpec().image_size
    ids = {sp: [im["id"] for im in world.lvis[sp]["images"]] for sp in ("train", "val")}
    assert not set(ids["train"]) & set(ids["val"]), "train and val image ids overlap"
    ann_ids = [a["id"] for sp in ("train", "val") for a in world.lvis[sp]["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)), "annotation ids are not unique across splits"
    for split in ("train", "val"):
        for im in world.lvis[split]["images"][:: max(1, len(world.lvis[split]["images"]) // 10)]:
            assert im["width"] == im["height"] == size
            with Image.open(world.root / "images" / im["file_name"]) as png:
                assert png.size == (size, size)
                assert png.mode == "RGB"


# ---------------------------------------------------------------------------------------------- long tail


def test_every_frequency_bucket_holds_at_least_five_categories(world: World) -> None:
    counts = _train_image_counts(world)
    buckets = Counter(_bucket(n) for n in counts.values())
    assert all(n >= 1 for n in counts.values()), "a category has no train image"
    for b in ("r", "c", "f"):
        assert buckets[b] >= 5, f"bucket {b!r} holds {buckets[b]} categories: {dict(buckets)}"
    assert world.summary["buckets"] == {b: buckets[b] for b in ("r", "c", "f")}


def test_train_image_counts_follow_a_steep_long_tail(world: World) -> None:
    counts = np.array(sorted(_train_image_counts(world).values(), reverse=True))
    median = float(np.median(counts))
    assert counts[0] >= 10 * median, f"head {counts[0]} vs median {median}"
    assert counts[0] >= 50 * counts[-1], f"head {counts[0]} vs tail {counts[-1]}"
    # the top 10% of the categories hold a large share of the category-image pairs
    top = max(1, len(counts) // 10)
    assert counts[:top].sum() >= 0.3 * counts.sum()


def test_category_records_agree_with_annotations(world: World) -> None:
    counts = _train_image_counts(world)
    instances = Counter(a["category_id"] for a in world.lvis["train"]["annotations"])
    for split in ("train", "val"):  # both files carry the train-split statistics
        for c in world.lvis[split]["categories"]:
            assert c["image_count"] == counts[c["id"]]
            assert c["instance_count"] == instances[c["id"]]
            assert c["frequency"] == _bucket(counts[c["id"]])
    meta = {c["id"]: c for c in world.world["categories"]}
    for c in world.lvis["train"]["categories"]:
        assert meta[c["id"]]["frequency"] == c["frequency"]
        assert meta[c["id"]]["image_count"]["train"] == counts[c["id"]]


def test_every_val_category_has_an_instance(world: World) -> None:
    in_val = {a["category_id"] for a in world.lvis["val"]["annotations"]}
    all_ids = {c["id"] for c in world.lvis["val"]["categories"]}
    assert in_val == all_ids, f"categories without val instances: {sorted(all_ids - in_val)}"
    assert world.summary["categories_missing_in_val"] == []
    rare = {c["id"] for c in world.lvis["val"]["categories"] if c["frequency"] == "r"}
    assert rare and rare <= in_val  # APr is defined


# ---------------------------------------------------------------------------------------------- hierarchy


def test_a_fifth_of_the_instances_take_part_in_a_relation(world: World) -> None:
    for split in ("train", "val"):
        pairs = world.world["relations"][split]
        members = {x for pair in pairs for x in pair}
        n = len(world.lvis[split]["annotations"])
        assert len(members) >= 0.2 * n, f"{split}: {len(members)} of {n} instances in a relation"
        assert world.world["hierarchy_fraction"][split] == pytest.approx(len(members) / n, abs=1e-4)
        assert world.summary["n_relations"][split] == len(pairs)


def test_relations_follow_the_declared_part_structure(world: World) -> None:
    meta = {c["id"]: c for c in world.world["categories"]}
    parts = {cid for cid, c in meta.items() if c["is_part"]}
    assert parts == set(world.summary["part_category_ids"])
    assert len(parts) >= 0.2 * len(meta)
    for split in ("train", "val"):
        anns = {a["id"]: a for a in world.lvis[split]["annotations"]}
        children = set()
        for parent_id, child_id in world.world["relations"][split]:
            parent, child = anns[parent_id], anns[child_id]
            assert parent["image_id"] == child["image_id"]
            assert child["category_id"] in parts
            assert parent["category_id"] not in parts
            assert parent["category_id"] in meta[child["category_id"]]["parent_ids"]
            assert child["category_id"] in meta[parent["category_id"]]["child_ids"]
            assert child_id not in children, "a part has two parents"
            children.add(child_id)
        # every part instance has its parent
        part_anns = {a["id"] for a in anns.values() if a["category_id"] in parts}
        assert part_anns == children


def test_part_masks_lie_inside_their_parent_masks(world: World) -> None:
    for split in ("train", "val"):
        anns = {a["id"]: a for a in world.lvis[split]["annotations"]}
        decoded: dict[int, np.ndarray] = {}
        worst = 1.0
        for parent_id, child_id in world.world["relations"][split]:
            for i in (parent_id, child_id):
                if i not in decoded:
                    decoded[i] = _decode(anns[i])
            child, parent = decoded[child_id], decoded[parent_id]
            assert child.any()
            inside = float((child & parent).sum()) / float(child.sum())
            worst = min(worst, inside)
            assert inside >= 0.99, f"{split}: part {child_id} only {inside:.3f} inside parent {parent_id}"
            assert parent.sum() > child.sum()
        assert worst >= 0.99


def test_parts_only_appear_with_a_parent_and_are_rarer(world: World) -> None:
    meta = {c["id"]: c for c in world.world["categories"]}
    for c in meta.values():
        if c["is_part"]:
            assert c["parent_ids"], f"part {c['name']} has no parent"
            parent_images = sum(meta[p]["image_count"]["train"] for p in c["parent_ids"])
            assert c["image_count"]["train"] <= parent_images
            assert all(not meta[p]["is_part"] for p in c["parent_ids"])
        else:
            assert c["parent_ids"] == []


# ---------------------------------------------------------------------------------------------- LVIS format


def test_lvis_loads_both_splits(world: World) -> None:
    lvis = pytest.importorskip("lvis")
    for split in ("train", "val"):
        path = world.root / f"lvis_v1_{split}.json"
        try:
            gt = lvis.LVIS(str(path))
        except AttributeError:  # an np.float leftover in lvis 0.5.3
            from pipeline.evaluation.lvis_eval import load_lvis

            gt = load_lvis(path)
        assert len(gt.get_img_ids()) == len(world.lvis[split]["images"])
        assert len(gt.get_ann_ids()) == len(world.lvis[split]["annotations"])
        assert len(gt.get_cat_ids()) == WorldSpec().n_categories


def test_lvis_v1_fields_exist(world: World) -> None:
    for split in ("train", "val"):
        data = world.lvis[split]
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        cat_ids = {c["id"] for c in data["categories"]}
        assert cat_ids == set(range(1, len(cat_ids) + 1))
        names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
        assert names == sorted(names), "ids are not assigned alphabetically by name"
        assert len(set(names)) == len(names)
        for c in data["categories"]:
            for key in ("id", "name", "frequency", "image_count", "instance_count", "synset", "synonyms", "def"):
                assert key in c, f"category lacks {key}"
            assert c["frequency"] in ("r", "c", "f")
            assert isinstance(c["synonyms"], list) and c["synonyms"]
            assert isinstance(c["def"], str) and c["def"]
        present: dict[int, set[int]] = defaultdict(set)
        for a in data["annotations"]:
            for key in ("id", "image_id", "category_id", "segmentation", "area", "bbox"):
                assert key in a, f"annotation lacks {key}"
            present[a["image_id"]].add(a["category_id"])
        for im in data["images"]:
            for key in ("id", "width", "height", "file_name", "coco_url", "neg_category_ids"):
                assert key in im, f"image lacks {key}"
            assert im["not_exhaustive_category_ids"] == []
            neg = set(im["neg_category_ids"])
            assert neg <= cat_ids
            assert not neg & present[im["id"]], "a negative category is annotated in the image"
            assert present[im["id"]], f"image {im['id']} has no annotation"


def test_annotation_geometry_is_consistent(world: World) -> None:
    size = WorldSpec().image_size
    for split in ("train", "val"):
        for a in world.lvis[split]["annotations"][::7]:
            mask = _decode(a)
            assert mask.shape == (size, size)
            assert a["segmentation"]["size"] == [size, size]
            assert a["area"] == int(mask.sum()) > 0
            ys, xs = np.nonzero(mask)
            x, y, w, h = a["bbox"]
            assert (x, y) == (xs.min(), ys.min())
            assert (w, h) == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_at_most_max_objects_top_level_instances_per_image(world: World) -> None:
    cap = WorldSpec().max_objects
    parts = set(world.summary["part_category_ids"])
    for split in ("train", "val"):
        tops = Counter(a["image_id"] for a in world.lvis[split]["annotations"] if a["category_id"] not in parts)
        assert max(tops.values()) <= cap


# ---------------------------------------------------------------------------------------------- base categories


def test_coco_base_train_holds_only_base_categories(world: World) -> None:
    base = set(world.summary["base_category_ids"])
    coco = world.coco_base
    assert base, "no base category"
    assert {c["id"] for c in coco["categories"]} == base
    assert {a["category_id"] for a in coco["annotations"]} == base
    expected = [a["id"] for a in world.lvis["train"]["annotations"] if a["category_id"] in base]
    assert [a["id"] for a in coco["annotations"]] == expected
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])
    assert [im["id"] for im in coco["images"]] == [im["id"] for im in world.lvis["train"]["images"]]
    meta_base = {c["id"] for c in world.world["categories"] if c["is_base"]}
    assert meta_base == base


def test_base_categories_are_frequent_or_common_never_rare(world: World) -> None:
    meta = {c["id"]: c for c in world.world["categories"]}
    base = set(world.summary["base_category_ids"])
    for cid in base:
        assert meta[cid]["frequency"] in ("f", "c"), f"base category {cid} is {meta[cid]['frequency']}"
    # the documented rule: every frequent category, plus every other common one by descending count
    counts = _train_image_counts(world)
    objects = list(meta.values())
    frequent = {c["id"] for c in objects if c["frequency"] == "f"}
    common = sorted((c for c in objects if c["frequency"] == "c"), key=lambda c: (-counts[c["id"]], c["id"]))
    assert base == frequent | {c["id"] for c in common[::2]}
    assert frequent and len(base) > len(frequent)
    assert any(meta[cid]["is_part"] for cid in base) and any(c["is_part"] and c["id"] not in base for c in objects)


# ---------------------------------------------------------------------------------------------- determinism, spec


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_spec_gives_byte_identical_files(tmp_path: Path) -> None:
    a = generate_world(SMALL, tmp_path / "a", progress=False)
    b = generate_world(SMALL, tmp_path / "b", progress=False)
    assert a == b
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(fa) == set(fb)
    assert any(name.endswith(".png") for name in fa)
    assert {"world.json", "lvis_v1_train.json", "lvis_v1_val.json", "coco_base_train.json"} <= set(fa)
    differing = [name for name in fa if fa[name] != fb[name]]
    assert differing == []


def test_different_seed_gives_different_files(tmp_path: Path) -> None:
    generate_world(SMALL, tmp_path / "a", progress=False)
    generate_world(replace(SMALL, seed=SMALL.seed + 1), tmp_path / "b", progress=False)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(fa) == set(fb)  # same spec shape, same file names
    for name in ("lvis_v1_train.json", "lvis_v1_val.json", "world.json"):
        assert fa[name] != fb[name]
    pngs = [name for name in fa if name.endswith(".png")]
    assert sum(fa[name] != fb[name] for name in pngs) == len(pngs)


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": 8},
        {"n_train": 0},
        {"n_val": -1},
        {"n_categories": 0},
        {"n_categories": 401},
        {"max_objects": 0},
    ],
)
def test_bad_spec_raises_a_one_line_pipeline_error(tmp_path: Path, bad: dict) -> None:
    out = tmp_path / "world"
    with pytest.raises(PipelineError) as info:
        generate_world(replace(SMALL, **bad), out, progress=False)
    message = str(info.value)
    assert message and "\n" not in message
    assert next(iter(bad)) in message
    assert not out.exists(), "a rejected spec still wrote files"


def test_a_spec_too_small_for_the_long_tail_is_refused(tmp_path: Path) -> None:
    """60 images of at most 6 objects cannot hold 40 categories' plan: an error, not silently empty categories."""
    with pytest.raises(PipelineError, match="no train image") as err:
        generate_world(WorldSpec(n_train=60, n_val=20), tmp_path / "world", progress=False)
    assert "\n" not in str(err.value)
