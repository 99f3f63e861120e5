"""The defaults sweep: its experiments, its choice rule and its tables, on `dvc exp show --json`-shaped input."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.experiments.report import ExperimentResult, experiments_from_show
from pipeline.experiments.sweep import (
    BASE,
    KNOBS,
    SWEEP_WORLD,
    Knob,
    choose,
    experiments,
    geometry_by_dim,
    knob_table,
    point,
)

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"seed": 0, "embed": {"dim": 32, "geometry": "poincare"}, "proposer": {"backbone": "resnet18"}}
PARAMS["sample"] = {"backbone": "resnet18"}
DIM = Knob("dim", "embedding dim", ("embed.dim",), ("2", "8", "32"))
EUCLIDEAN = Knob("euclidean-dim", "Euclidean dim", ("embed.dim",), ("2", "32"), {"embed.geometry": "euclidean"}, False)
BACKBONE = Knob("backbone", "backbone", ("proposer.backbone", "sample.backbone"), ("resnet18", "resnet50"))


def _results(ap_by_name: dict[str, list[float]]) -> dict[str, ExperimentResult]:
    """Results for experiments named <name>-s<seed>, majority AP as given, K 40, novel recall 0.2."""
    out = {}
    for name, aps in ap_by_name.items():
        for seed, ap in enumerate(aps):
            metrics = {
                "majority": {"AP": ap, "APr": 0.0},
                "hungarian": {"AP": ap / 2, "APr": None},
                "oracle": {"AP": 0.3},
                "clusters": {"K": 40 + seed},
                "proposals": {"recall@20/novel": 0.2},
            }
            out[f"{name}-s{seed}"] = ExperimentResult(f"{name}-s{seed}", "f" * 40, metrics, {})
    return out


def test_points_run_on_the_sweep_world_and_params_yaml_value_is_the_shared_base():
    assert SWEEP_WORLD["seed"] != str(PARAMS["seed"])  # the defaults are not chosen on the tables' world
    assert point(DIM, "32", PARAMS) is BASE
    assert point(DIM, "8", PARAMS).overrides == {"seed": "1", "embed.dim": "8"}
    assert point(EUCLIDEAN, "32", PARAMS).overrides == {"seed": "1", "embed.geometry": "euclidean", "embed.dim": "32"}
    assert point(BACKBONE, "resnet50", PARAMS).set_args() == [
        *("-S", "seed=1", "-S", "proposer.backbone=resnet50", "-S", "sample.backbone=resnet50")
    ]
    names = [exp.name for exp in experiments([DIM, EUCLIDEAN, BACKBONE], PARAMS)]
    assert names[0] == "sweep-base" and len(names) == len(set(names))
    assert names == [
        "sweep-base",
        "sweep-dim-2",
        "sweep-dim-8",
        "sweep-euclidean-dim-2",
        "sweep-euclidean-dim-32",
        "sweep-backbone-resnet50",
    ]


def test_params_yaml_value_is_always_a_point_and_knobs_must_agree():
    assert DIM.points({"embed": {"dim": 24}}) == ("2", "8", "32", "24")
    with pytest.raises(PipelineError, match="proposer.backbone, sample.backbone differ"):
        BACKBONE.default({"proposer": {"backbone": "resnet50"}, "sample": {"backbone": "resnet18"}})
    with pytest.raises(PipelineError, match="no param 'embed.dim'"):
        DIM.default({"embed": {}})


def test_choose_keeps_params_yaml_unless_beaten_by_more_than_noise():
    clear = _results({"sweep-base": [0.10, 0.11, 0.12], "sweep-dim-2": [0.05] * 3, "sweep-dim-8": [0.20, 0.21, 0.22]})
    choice = choose(DIM, PARAMS, clear, (0, 1, 2))
    assert choice.value == "8" and choice.changes_default and "0.210 against 0.110" in choice.reason
    noisy = _results({"sweep-base": [0.10, 0.11, 0.12], "sweep-dim-2": [0.05] * 3, "sweep-dim-8": [0.05, 0.12, 0.20]})
    choice = choose(DIM, PARAMS, noisy, (0, 1, 2))
    assert choice.value == "32" and not choice.changes_default and "within noise" in choice.reason
    best = _results({"sweep-base": [0.3] * 3, "sweep-dim-2": [0.05] * 3, "sweep-dim-8": [0.1] * 3})
    assert choose(DIM, PARAMS, best, (0, 1, 2)).reason.startswith("the params.yaml value has the highest")
    with pytest.raises(PipelineError, match="sweep-dim-8-s0"):
        choose(DIM, PARAMS, _results({"sweep-base": [0.1], "sweep-dim-2": [0.1]}), (0,))


def test_knob_table_marks_params_yaml_and_the_choice():
    results = _results({"sweep-base": [0.1, 0.2], "sweep-dim-2": [0.05, 0.05], "sweep-dim-8": [0.3, 0.3]})
    lines = knob_table(DIM, PARAMS, results, (0, 1), chosen="8").splitlines()
    assert lines[0].startswith("| value | majority AP | majority APr | hungarian AP |")
    cells = "0.050 ± 0.000 | 0.000 ± 0.000 | 0.025 ± 0.000 | n/a | 0.300 ± 0.000 | 0.200 ± 0.000 | 40"
    assert lines[2] == f"| 2 | {cells} |"  # k: the mean of 40 and 41, rounded
    assert lines[3].startswith("| 8 (**chosen**) | 0.300 ± 0.000 |")
    assert lines[4].startswith("| 32 (params.yaml) | 0.150 ± 0.071 |")


def test_geometry_by_dim_compares_the_dimensions_both_knobs_swept():
    results = _results(
        {
            "sweep-base": [0.2],
            "sweep-dim-2": [0.3],
            "sweep-dim-8": [0.1],
            "sweep-euclidean-dim-2": [0.1],
            "sweep-euclidean-dim-32": [0.25],
        }
    )
    text = geometry_by_dim(DIM, EUCLIDEAN, PARAMS, results, (0,)).splitlines()
    assert text == [
        "- dim 2: hyperbolic vs Euclidean, majority 0.300 vs 0.100 (holds); hungarian 0.150 vs 0.050 (holds)",
        "- dim 32: hyperbolic vs Euclidean, majority 0.200 vs 0.250 (fails); hungarian 0.100 vs 0.125 (fails)",
    ]


def test_proposal_metrics_are_read_under_their_own_key():
    rev = {
        "rev": "a" * 40,
        "name": "sweep-base-s0",
        "data": {
            "metrics": {
                "metrics/eval.json": {"data": {"majority": {"AP": 0.1}}},
                "metrics/propose_val.json": {"data": {"recall@20/novel": 0.2}},
            }
        },
    }
    only_proposals = {"rev": "b" * 40, "name": "failed", "data": {"metrics": rev["data"]["metrics"].copy()}}
    del only_proposals["data"]["metrics"]["metrics/eval.json"]
    results = experiments_from_show([{"rev": "main", "experiments": [{"revs": [rev]}, {"revs": [only_proposals]}]}])
    assert set(results) == {"sweep-base-s0"}
    assert results["sweep-base-s0"].metrics["proposals"] == {"recall@20/novel": 0.2}


def test_the_sweep_covers_the_knobs_the_defaults_need():
    params = {k.slug for k in KNOBS if k.choose}
    assert {"dim", "epochs", "k", "crop", "backbone"} <= params
    import yaml

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    for knob in KNOBS:
        assert knob.default(shipped) in knob.points(shipped)  # every knob reads params that exist and agree


def test_stage_dry_run_lists_every_experiment_and_refuses_unknown_knobs():
    run = [sys.executable, "-m", "stages.sweep"]
    args = ["--dry-run", "--seeds", "2", "--knob", "dim"]
    done = subprocess.run([*run, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "sweep-base-s0: dvc exp run -S seed=1 -S embed.seed=0 -S cluster.seed=0"
    assert len(lines) == 2 * 7 and all(line.startswith("sweep-") for line in lines)  # base + 6 other dims, 2 seeds
    done = subprocess.run([*run, "--dry-run", "--knob", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: unknown knob(s) nope (known: dim, epochs, k, crop, backbone, proposer-epochs, euclidean-dim)"
    ]


def test_a_knob_judged_by_hungarian_ignores_majority_ap():
    k = Knob("k", "clusters", ("cluster.k",), ("auto", "80"), criterion="hungarian")
    results = _results({"sweep-base": [0.10, 0.10], "sweep-k-80": [0.30, 0.30]})  # majority: 80 far ahead
    for seed in (0, 1):
        results[f"sweep-k-80-s{seed}"].metrics["hungarian"]["AP"] = 0.01  # hungarian: 80 far behind
    choice = choose(k, {"cluster": {"k": "auto"}}, results, (0, 1))
    assert choice.value == "auto" and "hungarian AP (0.050)" in choice.reason


def test_the_run_record_round_trips_and_a_corrupt_one_is_one_error(tmp_path):
    from stages.sweep import _read_runs, _write_runs

    record = tmp_path / "sweep_runs.json"
    _write_runs(record, {"sweep-base-s0": (["embed", "cluster"], 24.04)})
    assert _read_runs(record) == {"sweep-base-s0": (["embed", "cluster"], 24.0)}
    record.write_text("[1, 2")
    with pytest.raises(PipelineError, match="sweep_runs.json: not a sweep record"):
        _read_runs(record)
    with pytest.raises(PipelineError, match="needs the record of a sweep that ran"):
        _read_runs(tmp_path / "missing.json")
