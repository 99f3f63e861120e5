from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params, parse_params
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent


def default() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


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
