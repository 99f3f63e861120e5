import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import RANGES, Params, _within, as_dict, load_params, parse_params
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent


def default() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(tmp_path: Path, dotted: str, text: str) -> Path:
    """A copy of the repository's params.yaml in tmp_path with `dotted`'s value written as `text`."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    path: list[str] = []
    for i, line in enumerate(lines):
        m = re.match(r"( *)(\w+):( *)([^#]*?)( *#.*)?$", line)
        if m is None:
            continue
        path[len(m[1]) // 2 :] = [m[2]]
        if ".".join(path) == dotted:
            lines[i] = f"{m[1]}{m[2]}: {text}{m[5] or ''}"
            break
    else:
        raise KeyError(dotted)
    out = tmp_path / "params.yaml"
    out.write_text("\n".join(lines) + "\n")
    return out


def numeric_fields(cls: type = Params, prefix: str = "") -> dict[str, object]:
    """Dotted name -> annotation of every field that holds a number (int, float, or a union with one)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        where = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            out.update(numeric_fields(tp, f"{where}."))
        elif tp in (int, float) or {int, float} & set(typing.get_args(tp)):
            out[where] = tp
    return out


def test_repository_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.propose.max_proposals == 20
    assert p.propose.score_thresh == 0.5 and p.propose.nms_thresh == 0.6


def test_every_key_is_commented_once():
    for line in (ROOT / "params.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in stripped, f"uncommented key: {line!r}"


def test_unknown_key_named():
    data = default()
    data["proposer"]["epocs"] = 3
    with pytest.raises(PipelineError, match=r"unknown key 'proposer\.epocs'"):
        parse_params(data)


def test_mistyped_key_named():
    data = default()
    data["proposer"]["epochs"] = "ten"
    with pytest.raises(PipelineError, match=r"proposer\.epochs: expected int, got 'ten'"):
        parse_params(data)


def test_bool_is_not_an_int():
    data = default()
    data["seed"] = True
    with pytest.raises(PipelineError, match="seed: expected int"):
        parse_params(data)


def test_int_accepted_for_float():
    data = default()
    data["proposer"]["lr"] = 1
    assert parse_params(data).proposer.lr == 1.0


def test_choice_checked():
    data = default()
    data["data"]["source"] = "imagenet"
    with pytest.raises(PipelineError, match=r"data\.source: expected one of 'synthetic' \| 'lvis'"):
        parse_params(data)


def test_evaluate_backend_checked():
    from pipeline.config import Evaluate
    from pipeline.evaluation.lvis_eval import BACKENDS

    data = default()
    assert parse_params(data).evaluate.backend == "faster_coco_eval" == BACKENDS[0]
    assert typing.get_args(typing.get_type_hints(Evaluate)["backend"]) == BACKENDS  # the same names, same order
    data["evaluate"]["backend"] = "lvis"
    assert parse_params(data).evaluate.backend == "lvis"
    data["evaluate"]["backend"] = "pycocotools"
    with pytest.raises(
        PipelineError,
        match=r"^params\.yaml: evaluate\.backend: expected one of 'faster_coco_eval' \| "
        r"'lvis', got 'pycocotools'$",
    ):
        parse_params(data)


def test_missing_key_named():
    data = default()
    del data["propose"]["batch_size"]
    with pytest.raises(PipelineError, match=r"missing key 'propose\.batch_size'"):
        parse_params(data)


def test_optional_path():
    data = default()
    data["proposer"]["weights"] = "/some/file.pth"
    assert parse_params(data).proposer.weights == "/some/file.pth"
    data["proposer"]["weights"] = 3
    with pytest.raises(PipelineError, match="proposer.weights: expected str or null"):
        parse_params(data)


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(PipelineError, match=r"params.yaml: not valid YAML at line \d+") as err:
        load_params(bad)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("embed.lr", "1e-4", 1e-4),
        ("embed.lr", "1E-4", 1e-4),
        ("proposer.lr", "2.5E-3", 2.5e-3),
        ("proposer.lr", "+2e-2", 0.02),
        ("cluster.tol", "1e-6", 1e-6),
        ("embed.weight_decay", "0e0", 0.0),
        ("loss.margin", ".5", 0.5),
        ("embed.curvature", "5e3", 5000.0),
        ("evaluate.max_dets", "1e3", 1000),  # an integral float is an int
        ("embed.epochs", "30.0", 30),
    ],
)
def test_exponent_forms_load(tmp_path, key, text, expected):
    group, name = key.split(".")
    value = getattr(getattr(load_params(with_value(tmp_path, key, text)), group), name)
    assert value == pytest.approx(expected) and type(value) is type(expected)


def test_yaml_floats_leave_safe_load_alone():
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}  # only our loader reads YAML 1.2 floats


def test_negative_exponent_form_is_a_number_out_of_range(tmp_path):
    with pytest.raises(PipelineError) as err:
        load_params(with_value(tmp_path, "embed.lr", "-2.5e-3"))
    assert str(err.value) == f"{tmp_path / 'params.yaml'}: embed.lr: must be > 0, got -0.0025"


def test_number_string_accepted_for_float_only():
    data = default()
    data["embed"]["lr"] = "1e-4"  # as a tool may write it, quoted
    data["cluster"]["tol"] = " 1E-6 "
    p = parse_params(data)
    assert p.embed.lr == 1e-4 and p.cluster.tol == 1e-6
    data["embed"]["epochs"] = "30"
    with pytest.raises(PipelineError, match=r"embed\.epochs: expected int, got '30'"):
        parse_params(data)


@pytest.mark.parametrize("text", ["nan", "inf", "1e-4x", "0x10", "1_0.0", ""])
def test_other_strings_are_not_floats(text):
    data = default()
    data["proposer"]["lr"] = text
    with pytest.raises(PipelineError, match=rf"proposer\.lr: expected float, got '{re.escape(text)}'"):
        parse_params(data)


def test_numeric_looking_paths_stay_strings(tmp_path):
    path = with_value(tmp_path, "sample.backbone_init", "'1e-4'")
    text = path.read_text().replace("coco_image_root: null", "coco_image_root: '2017'")
    path.write_text(text)
    p = load_params(path)
    assert p.sample.backbone_init == "1e-4" and p.data.lvis.coco_image_root == "2017"
    data = as_dict(p)
    data["data"]["lvis"]["image_root"] = "5e3"
    assert parse_params(data).data.lvis.image_root == "5e3"
    data["data"]["lvis"]["coco_image_root"] = 5e3  # unquoted 5e3 is a number, not a path
    with pytest.raises(PipelineError, match=r"data\.lvis\.coco_image_root: expected str or null, got 5000\.0"):
        parse_params(data)


def test_non_integral_float_for_int_rejected():
    data = default()
    data["proposer"]["epochs"] = 2.5
    with pytest.raises(PipelineError, match=r"proposer\.epochs: expected int, got 2\.5"):
        parse_params(data)
    data["proposer"]["epochs"] = float("nan")
    with pytest.raises(PipelineError, match=r"proposer\.epochs: expected int, got nan"):
        parse_params(data)


OUT_OF_RANGE = [
    ("propose.score_thresh", 2, "must be in [0, 1), got 2"),
    ("propose.score_thresh", 1.0, "must be in [0, 1), got 1"),
    ("propose.nms_thresh", -0.1, "must be in [0, 1], got -0.1"),
    ("sample.object_iou", 1, "must be in [0, 1), got 1"),
    ("sample.hier_containment", 0, "must be in (0, 1], got 0"),
    ("sample.hier_containment", 1.5, "must be in (0, 1], got 1.5"),
    ("evaluate.match_iou", 0.0, "must be in (0, 1], got 0"),
    ("embed.lr", -1e-4, "must be > 0, got -0.0001"),
    ("proposer.lr", 0, "must be > 0, got 0"),
    ("embed.lr", float("nan"), "must be a finite number, got nan"),
    ("loss.margin", float("inf"), "must be a finite number, got inf"),
    ("embed.weight_decay", -1e-5, "must be >= 0, got -1e-05"),
    ("embed.curvature", 0, "must be > 0, got 0"),
    ("loss.object", -1, "must be >= 0, got -1"),
    ("loss.margin", -0.2, "must be >= 0, got -0.2"),
    ("cluster.tol", -1e-6, "must be >= 0, got -1e-06"),
    ("proposer.epochs", 0, "must be >= 1, got 0"),
    ("embed.batch_size", 0, "must be >= 1, got 0"),
    ("propose.max_proposals", 0, "must be >= 1, got 0"),
    ("embed.num_workers", -1, "must be >= 0, got -1"),
    ("embed.checkpoint_every", 0, "must be >= 1, got 0"),
    ("proposer.checkpoint_every", 0, "must be >= 1, got 0"),
    ("embed.dim", 1, "must be >= 2, got 1"),
    ("proposer.image_size", 32, "must be >= 64, got 32"),
    ("data.synthetic.image_size", 16, "must be >= 32, got 16"),
    ("data.synthetic.n_categories", 401, "must be in [1, 400], got 401"),
    ("data.synthetic.n_val", 0, "must be >= 1, got 0"),
    ("sample.crop_size", 16, "must be >= 32, got 16"),
    ("sample.relation_max_side", 0, "must be >= 1, got 0"),
    ("cluster.k", 0, "must be >= 1, got 0"),
    ("cluster.max_iter", 0, "must be >= 1, got 0"),
    ("evaluate.max_dets", 0, "must be >= 1, got 0"),
    ("seed", -1, "must be in [0, 2147483647], got -1"),
    ("cluster.seed", 2**31, "must be in [0, 2147483647], got 2147483648"),
]


@pytest.mark.parametrize(("key", "value", "problem"), OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _ in OUT_OF_RANGE])
def test_out_of_range_named(key, value, problem):
    data = default()
    *groups, name = key.split(".")
    node = data
    for g in groups:
        node = node[g]
    node[name] = value
    with pytest.raises(PipelineError) as err:
        parse_params(data)
    assert str(err.value) == f"params.yaml: {key}: {problem}"


def test_out_of_range_from_file(tmp_path):
    path = with_value(tmp_path, "propose.score_thresh", "2")
    with pytest.raises(PipelineError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: propose.score_thresh: must be in [0, 1), got 2"


def test_edges_accepted():
    data = default()
    data["propose"]["score_thresh"] = 0
    data["propose"]["nms_thresh"] = 1
    data["sample"]["hier_containment"] = 1  # the released code's full containment
    data["sample"]["object_iou"] = 0
    data["evaluate"]["match_iou"] = 1
    data["loss"]["hier"] = 0  # one term off is an ablation, not an error
    data["cluster"]["k"] = 1
    data["cluster"]["k_range"] = [1, 3, 1]
    data["embed"]["num_workers"] = 0
    p = parse_params(data)
    assert p.propose.score_thresh == 0.0 and p.loss.hier == 0.0 and p.cluster.k == 1


@pytest.mark.parametrize("k_range", [[120, 10, 10], [0, 10, 1], [10, 20, 0], [10, 20, 10], [1, 2], [1, 5, 1, 1]])
def test_bad_k_range(k_range):
    data = default()
    data["cluster"]["k_range"] = k_range
    with pytest.raises(PipelineError) as err:
        parse_params(data)
    assert str(err.value) == (
        "params.yaml: cluster.k_range: must be [start, stop, step] with 1 <= start <= stop, step >= 1 "
        f"and at least 3 values of k (the elbow needs 3), got {k_range}"
    )


def test_all_loss_weights_zero():
    data = default()
    data["loss"].update(mask=0, object=0.0, hier=0)
    with pytest.raises(PipelineError) as err:
        parse_params(data)
    assert str(err.value) == "params.yaml: loss: mask, object and hier are all 0; at least one weight must be > 0"


def test_too_many_synthetic_images():
    data = default()
    data["data"]["synthetic"].update(n_train=900_000, n_val=100_000)
    with pytest.raises(PipelineError, match=r"data\.synthetic: n_train \+ n_val must be at most 999999, got 1000000"):
        parse_params(data)


def test_every_number_has_a_range():
    fields = numeric_fields()
    assert set(RANGES) <= set(fields)
    assert set(fields) - set(RANGES) == {"cluster.k_range"}  # a list, checked as a whole (test_bad_k_range)
    for rule in RANGES.values():
        _within(0, rule)  # every rule parses


def test_dataclass_defaults_are_in_range():
    assert parse_params(as_dict(Params())) == Params()


def test_new_keys_checked():
    data = default()
    assert parse_params(data).sample.dtype == "float16"
    data["sample"]["dtype"] = "float64"
    with pytest.raises(PipelineError, match=r"sample\.dtype: expected one of 'float16' \| 'float32', got 'float64'"):
        parse_params(data)
    data = default()
    data["data"]["lvis"]["coco_image_root"] = "/datasets/coco/train2017"
    assert parse_params(data).data.lvis.coco_image_root == "/datasets/coco/train2017"


def test_stage_refuses_bad_params_before_any_work(tmp_path):
    bad = with_value(tmp_path, "propose.score_thresh", "2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "stages.prepare", "--params-file", str(bad)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "propose.score_thresh: must be in [0, 1), got 2" in lines[0]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_devices_accepted(device):
    assert parse_params({**default(), "device": device}).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:0 "])
def test_bad_device_named(device):
    with pytest.raises(PipelineError, match=r"^params\.yaml: device: expected auto, cpu, cuda or cuda:<n>, got"):
        parse_params({**default(), "device": device})


def test_amp_and_workers(tmp_path):
    from pipeline.config import store_params

    p = load_params(ROOT / "params.yaml")  # a bare `off` (YAML 1.1's false) is the choice "off"
    assert p.propose.amp == p.sample.amp == "off"
    assert p.proposer.num_workers == p.propose.num_workers == p.sample.num_workers == "auto"
    assert load_params(with_value(tmp_path, "sample.num_workers", "3")).sample.num_workers == 3
    with pytest.raises(PipelineError, match=r"params\.yaml: propose\.num_workers: expected int or 'auto', got 'many'$"):
        load_params(with_value(tmp_path, "propose.num_workers", "many"))
    assert load_params(with_value(tmp_path, "sample.amp", "bf16")).sample.amp == "bf16"
    with pytest.raises(PipelineError, match=r"propose\.amp: expected one of 'off' \| 'bf16' \| 'fp16', got 'fp8'"):
        load_params(with_value(tmp_path, "propose.amp", "fp8"))
    with pytest.raises(PipelineError, match=r"sample\.num_workers: must be >= 0, got -1"):
        load_params(with_value(tmp_path, "sample.num_workers", "-1"))
    # a store records neither the workers nor amp at its default: the stores made before them keep their bytes
    assert "num_workers" not in store_params(p.propose) and "amp" not in store_params(p.sample)
    faster = dataclasses.replace(p.sample, num_workers=4, amp="bf16")
    assert store_params(faster) == {**store_params(p.sample), "amp": "bf16"}
