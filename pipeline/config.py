"""Typed params: params.yaml parsed into frozen dataclasses, with one-line errors naming the key.

Every group of params.yaml is a dataclass below; an unknown key, a missing key, a value of the wrong
type or out of its range (`RANGES`, plus the few rules between keys in `_check_together`) is rejected
with a message such as ``params.yaml: proposer.epochs: expected int, got 'ten'`` or
``params.yaml: propose.score_thresh: must be in [0, 1), got 2``.

Numbers as people write them: the loader reads floats the YAML 1.2 way, so ``1e-4``, ``5E3`` and ``-.5``
are numbers (PyYAML's YAML 1.1 reads ``1e-4`` as a string); a float field also takes a string holding a
plain decimal or exponent number (``'1e-4'``, as a tool may quote it). String fields never become numbers.
An int field takes an integral float (``max_dets: 1e3`` is 1000) and rejects any other (``2.5``, ``nan``).
NaN and infinities are rejected everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError

# How a param enters the params a store records (`store_params`): one that only sets how fast a stage runs
# (or how often it checkpoints) never does, nor is it among the stage's params in dvc.yaml, so changing it
# re-runs nothing; one added after the stores existed does only when set away from its default, so that the
# stores made with the default keep their bytes.
SPEED_ONLY = {"store": "never"}
RECORDED_WHEN_SET = {"store": "when_set"}


@dataclass(frozen=True)
class SyntheticData:
    n_train: int = 400
    n_val: int = 120
    image_size: int = 128
    n_categories: int = 40
    max_objects: int = 6
    hierarchy: Literal["flat", "deep"] = "flat"  # deep: super-categories, object > part > sub-part


@dataclass(frozen=True)
class LvisData:
    train_json: str = ""
    val_json: str = ""
    image_root: str = ""
    coco_json: str = ""
    coco_image_root: str | None = None  # COCO's file_name folder; None: <image_root>/train2017


@dataclass(frozen=True)
class Data:
    source: Literal["synthetic", "lvis"] = "synthetic"
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    lvis: LvisData = field(default_factory=LvisData)


@dataclass(frozen=True)
class Proposer:
    seed: int = 0  # initial weights, batch order, augmentations, RoI samples (the global seed makes the data)
    backbone: Literal["resnet18", "resnet50", "mobilenet_v3"] = "resnet18"
    image_size: int = 128
    weights: str | None = None
    epochs: int = 8
    batch_size: int = 4  # the global batch: split across the ranks under torchrun
    lr: float = 0.02
    checkpoint_every: int = field(default=100, metadata=SPEED_ONLY)  # resumes give the same weights
    roi_align_grad: Literal["sparse", "torchvision"] = (
        "sparse"  # RoIAlign's CPU backward (pipeline/models/roi_align.py)
    )
    fpn_channels: int = 128  # FPN width, the heads' input (torchvision: 256)
    rois_per_image: int | None = 32  # RoIs sampled per image for the box and mask heads (None: 64 below 512 px)
    num_workers: int | Literal["auto"] = field(default="auto", metadata=SPEED_ONLY)  # decoding workers; auto: GPU only
    amp: Literal["off", "bf16", "fp16"] = "off"  # training autocast (changes the weights; fp16 with a GradScaler)


@dataclass(frozen=True)
class Propose:
    score_thresh: float = 0.5
    nms_thresh: float = 0.6
    max_proposals: int = 20
    batch_size: int = 8
    on_missing_image: Literal["error", "skip"] = "error"
    num_workers: int | Literal["auto"] = field(default="auto", metadata=SPEED_ONLY)  # decoding workers; auto: GPU only
    amp: Literal["off", "bf16", "fp16"] = field(default="off", metadata=RECORDED_WHEN_SET)  # inference autocast


@dataclass(frozen=True)
class Sample:
    crop_size: int = 64
    backbone: Literal["resnet18", "resnet50"] = "resnet18"
    backbone_init: str = "proposer"  # random | proposer | a local weights file
    object_iou: float = 0.4
    hier_containment: float = 1.0
    hier_exclude_objects: bool = True
    relation_max_side: int | None = None
    batch_size: int = 128
    dtype: Literal["float16", "float32"] = "float16"
    num_workers: int | Literal["auto"] = field(default="auto", metadata=SPEED_ONLY)  # decoding workers; auto: GPU only
    amp: Literal["off", "bf16", "fp16"] = field(default="off", metadata=RECORDED_WHEN_SET)  # backbone autocast


@dataclass(frozen=True)
class Embed:
    seed: int = 0
    geometry: Literal["poincare", "euclidean"] = "poincare"
    curvature: float = 1.0
    hidden: int = 256
    dim: int = 256
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    num_workers: int = field(default=0, metadata=SPEED_ONLY)
    checkpoint_every: int = field(default=100, metadata=SPEED_ONLY)  # resumes give the same head
    view: Literal["fg", "box"] = "fg"
    init: Literal["released", "torch"] = "released"
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class Loss:
    mask: float = 1.0
    object: float = 1.0
    hier: float = 1.0
    margin: float = 0.2
    euclidean_margin: Literal["half", "same"] = "half"


@dataclass(frozen=True)
class Cluster:
    seed: int = 0
    k: int | Literal["auto"] = "auto"
    k_range: list[int] = field(default_factory=lambda: [10, 120, 10])
    centroid: Literal["einstein", "frechet"] = "einstein"
    max_iter: int = 100
    tol: float = 1e-6


@dataclass(frozen=True)
class Evaluate:
    match_iou: float = 0.5
    max_dets: int = 300
    backend: Literal["faster_coco_eval", "lvis"] = "faster_coco_eval"  # evaluation/lvis_eval.py BACKENDS


@dataclass(frozen=True)
class Dist:
    nproc: int = 1


@dataclass(frozen=True)
class Params:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<n> (checked in _check_together)
    data: Data = field(default_factory=Data)
    proposer: Proposer = field(default_factory=Proposer)
    propose: Propose = field(default_factory=Propose)
    sample: Sample = field(default_factory=Sample)
    embed: Embed = field(default_factory=Embed)
    loss: Loss = field(default_factory=Loss)
    cluster: Cluster = field(default_factory=Cluster)
    evaluate: Evaluate = field(default_factory=Evaluate)
    dist: Dist = field(default_factory=Dist)


SEED = "[0, 2147483647]"  # numpy, torch and faiss (a C int) all take it

# The allowed range of every numeric param, keyed by its dotted name: ">= a", "> a", or an interval with
# [ ] closed and ( ) open ends. None (an unset optional) and the choice "auto" are not checked here.
RANGES: dict[str, str] = {
    "seed": SEED,
    "data.synthetic.n_train": ">= 1",
    "data.synthetic.n_val": ">= 1",  # propose@val and evaluate need val images
    "data.synthetic.image_size": ">= 32",  # pipeline/data/synthetic.py's minimum
    "data.synthetic.n_categories": "[1, 400]",  # pipeline/data/synthetic.py's limits
    "data.synthetic.max_objects": ">= 1",
    "proposer.seed": SEED,
    "proposer.image_size": ">= 64",  # pipeline/models/proposer.py's build_model minimum
    "proposer.epochs": ">= 1",
    "proposer.batch_size": ">= 1",
    "proposer.lr": "> 0",
    "proposer.checkpoint_every": ">= 1",
    "proposer.fpn_channels": ">= 8",
    "proposer.rois_per_image": ">= 4",
    "proposer.num_workers": ">= 0",
    "propose.score_thresh": "[0, 1)",  # kept when score > thresh: 1 keeps nothing
    "propose.nms_thresh": "[0, 1]",  # 0 suppresses any overlap, 1 none
    "propose.max_proposals": ">= 1",
    "propose.batch_size": ">= 1",
    "propose.num_workers": ">= 0",
    "sample.crop_size": ">= 32",  # the backbone's stride: smaller crops pool less than one feature cell
    "sample.object_iou": "[0, 1)",  # pairs with IoU > this: 1 makes none (pipeline/geometry/relations.py)
    "sample.hier_containment": "(0, 1]",  # fraction >= this: 0 pairs every larger mask (pipeline/geometry/relations.py)
    "sample.relation_max_side": ">= 1",
    "sample.batch_size": ">= 1",
    "sample.num_workers": ">= 0",
    "embed.seed": SEED,
    "embed.curvature": "> 0",
    "embed.hidden": ">= 1",
    "embed.dim": ">= 2",  # the disk plot needs two directions
    "embed.epochs": ">= 1",
    "embed.batch_size": ">= 1",
    "embed.lr": "> 0",
    "embed.weight_decay": ">= 0",
    "embed.num_workers": ">= 0",
    "embed.checkpoint_every": ">= 1",
    "loss.mask": ">= 0",
    "loss.object": ">= 0",
    "loss.hier": ">= 0",
    "loss.margin": ">= 0",
    "cluster.seed": SEED,
    "cluster.k": ">= 1",
    "cluster.max_iter": ">= 1",
    "cluster.tol": ">= 0",
    "evaluate.match_iou": "(0, 1]",  # matched at IoU >= this: 0 would match anything (evaluation/matching.py)
    "evaluate.max_dets": ">= 1",
    "dist.nproc": ">= 1",
}

_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # what pipeline/device.py's pick_device takes
_BOUND = re.compile(r"(>=|>) (-?[0-9.]+)")
_INTERVAL = re.compile(r"([\[(])(-?[0-9.]+), (-?[0-9.]+)([\])])")
# YAML 1.2 floats (plus YAML 1.1's underscores): exponents without a dot or a sign, and -.5, are numbers
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?\.(?:inf|Inf|INF)
    | \.(?:nan|NaN|NAN))$""",
    re.X,
)
_FLOAT_TEXT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")  # a float field's string


class ParamsLoader(yaml.SafeLoader):
    """SafeLoader whose implicit floats follow YAML 1.2: ``1e-4`` is 0.0001, not the string '1e-4'."""


ParamsLoader.yaml_implicit_resolvers = {  # our own copy: SafeLoader's resolvers stay as they are
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _show(value: float) -> str:
    """A number as written in a message: 2 rather than 2.0."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e16 else str(value)


def _within(value: float, rule: str) -> bool:
    if m := _BOUND.fullmatch(rule):
        return value >= float(m[2]) if m[1] == ">=" else value > float(m[2])
    m = _INTERVAL.fullmatch(rule)
    if m is None:
        raise ValueError(f"bad range rule {rule!r}")
    lo, hi = float(m[2]), float(m[3])
    return (value >= lo if m[1] == "[" else value > lo) and (value <= hi if m[4] == "]" else value < hi)


def _check_range(value: Any, key: str, source: str) -> None:
    rule = RANGES.get(key)
    if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not _within(value, rule):
        what = f"in {rule}" if rule[0] in "[(" else rule
        raise PipelineError(f"{source}: {key}: must be {what}, got {_show(value)}")


def _coerce_float(value: Any, key: str, source: str) -> float:
    number_text = isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip())
    if number_text or (isinstance(value, int) and not isinstance(value, bool)):
        try:
            value = float(value)
        except OverflowError:  # an int beyond any float
            value = math.inf
    if type(value) is not float:
        raise PipelineError(f"{source}: {key}: expected float, got {value!r}")
    if not math.isfinite(value):
        raise PipelineError(f"{source}: {key}: must be a finite number, got {value}")
    return value


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` (ints and number strings pass as floats, integral floats as ints)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PipelineError(f"{source}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise PipelineError(f"{source}: {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is Literal:
        if value is False and "off" in typing.get_args(tp):
            return "off"  # YAML 1.1 reads a bare `off` as false
        if value not in typing.get_args(tp):
            raise PipelineError(f"{source}: {key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key, source)
            except PipelineError as err:
                errors.append(err)
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
        raise PipelineError(f"{source}: {key}: expected {names}, got {value!r}")
    if tp is float:
        return _coerce_float(value, key, source)
    if tp is int and type(value) is float and value.is_integer():
        return int(value)  # 1e3 reads as the float 1000.0
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise PipelineError(f"{source}: {key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise PipelineError(f"{source}: unknown key {where!r} (known here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        where = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            raise PipelineError(f"{source}: missing key {where!r}")
        kwargs[f.name] = _coerce(data[f.name], hints[f.name], where, source)
        _check_range(kwargs[f.name], where, source)
    return cls(**kwargs)


def _check_together(p: Params, source: str) -> None:
    """The rules that involve more than one value (and the device's spelling)."""
    if not _DEVICE.fullmatch(p.device):
        raise PipelineError(f"{source}: device: expected auto, cpu, cuda or cuda:<n>, got {p.device!r}")
    k_range = p.cluster.k_range
    ok = len(k_range) == 3 and 1 <= k_range[0] <= k_range[1] and k_range[2] >= 1
    if not ok or len(range(k_range[0], k_range[1] + 1, k_range[2])) < 3:
        raise PipelineError(
            f"{source}: cluster.k_range: must be [start, stop, step] with 1 <= start <= stop, step >= 1 "
            f"and at least 3 values of k (the elbow needs 3), got {k_range}"
        )
    if not (p.loss.mask or p.loss.object or p.loss.hier):
        raise PipelineError(f"{source}: loss: mask, object and hier are all 0; at least one weight must be > 0")
    n_images = p.data.synthetic.n_train + p.data.synthetic.n_val
    if n_images > 999_999:  # pipeline/data/synthetic.py's limit
        raise PipelineError(f"{source}: data.synthetic: n_train + n_val must be at most 999999, got {n_images}")


def parse_params(data: dict, source: str = "params.yaml") -> Params:
    """Typed params from an already-parsed mapping, every value checked against its type and range."""
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping at the top level")
    params = _build(Params, data, "", source)
    _check_together(params, source)
    return params


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml (floats the YAML 1.2 way: ``1e-4`` is a number)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=ParamsLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PipelineError(f"{path}: not valid YAML{where}") from None
    return parse_params(data, str(path))


def as_dict(obj: Any) -> dict:
    """Params (or one group) as a plain dict, for store attrs and logs."""
    return dataclasses.asdict(obj)


def speed_only(group: type | Any) -> tuple[str, ...]:
    """The fields of a params group that set only how a run goes, not what it makes (`SPEED_ONLY`)."""
    return tuple(f.name for f in dataclasses.fields(group) if f.metadata.get("store") == "never")


def store_params(group: Any) -> dict:
    """One params group as the dict a store records and keys its parts by: `as_dict` without the params that
    only set the speed (`SPEED_ONLY`: num_workers) and without those at their default that were added after
    the stores existed (`RECORDED_WHEN_SET`: amp off), so a default store keeps its bytes."""
    out = as_dict(group)
    for f in dataclasses.fields(group):
        rule = f.metadata.get("store")
        if rule == "never" or (rule == "when_set" and getattr(group, f.name) == f.default):
            del out[f.name]
    return out
