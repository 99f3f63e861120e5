"""Typed params: params.yaml parsed into frozen dataclasses, with one-line errors naming the key.

Every group of params.yaml is a dataclass below; an unknown key, a missing key or a value of the
wrong type is rejected with a message such as ``params.yaml: proposer.epochs: expected int, got 'ten'``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class SyntheticData:
    n_train: int = 400
    n_val: int = 120
    image_size: int = 128
    n_categories: int = 40
    max_objects: int = 6


@dataclass(frozen=True)
class LvisData:
    train_json: str = ""
    val_json: str = ""
    image_root: str = ""
    coco_json: str = ""


@dataclass(frozen=True)
class Data:
    source: Literal["synthetic", "lvis"] = "synthetic"
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    lvis: LvisData = field(default_factory=LvisData)


@dataclass(frozen=True)
class Proposer:
    backbone: Literal["resnet18", "resnet50", "mobilenet_v3"] = "resnet18"
    image_size: int = 128
    weights: str | None = None
    epochs: int = 8
    batch_size: int = 4
    lr: float = 0.02


@dataclass(frozen=True)
class Propose:
    score_thresh: float = 0.5
    nms_thresh: float = 0.6
    max_proposals: int = 20
    batch_size: int = 8
    on_missing_image: Literal["error", "skip"] = "error"


@dataclass(frozen=True)
class Sample:
    crop_size: int = 64
    backbone: Literal["resnet18", "resnet50"] = "resnet18"
    backbone_init: str = "proposer"  # random | proposer | a local weights file
    object_iou: float = 0.4
    hier_containment: float = 0.95
    relation_max_side: int | None = None
    batch_size: int = 128


@dataclass(frozen=True)
class Embed:
    seed: int = 0
    geometry: Literal["poincare", "euclidean"] = "poincare"
    curvature: float = 1.0
    hidden: int = 256
    dim: int = 32
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-5


@dataclass(frozen=True)
class Loss:
    mask: float = 1.0
    object: float = 1.0
    hier: float = 1.0
    margin: float = 0.2


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


@dataclass(frozen=True)
class Params:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: Data = field(default_factory=Data)
    proposer: Proposer = field(default_factory=Proposer)
    propose: Propose = field(default_factory=Propose)
    sample: Sample = field(default_factory=Sample)
    embed: Embed = field(default_factory=Embed)
    loss: Loss = field(default_factory=Loss)
    cluster: Cluster = field(default_factory=Cluster)
    evaluate: Evaluate = field(default_factory=Evaluate)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
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
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
    return cls(**kwargs)


def parse_params(data: dict, source: str = "params.yaml") -> Params:
    """Typed params from an already-parsed mapping."""
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping at the top level")
    return _build(Params, data, "", source)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PipelineError(f"{path}: not valid YAML{where}") from None
    return parse_params(data, str(path))


def as_dict(obj: Any) -> dict:
    """Params (or one group) as a plain dict, for store attrs and logs."""
    return dataclasses.asdict(obj)
