"""The tables report: reading `dvc exp show --json` and formatting rows (the numbers are never computed here)."""

import pytest

from pipeline.errors import PipelineError
from pipeline.experiments.report import (
    SUPERVISED,
    TABLE1,
    TABLE2,
    Experiment,
    ExperimentResult,
    experiments_from_show,
    provenance,
    table,
)


def _metrics(ap: float) -> dict:
    row = {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2, "APr": None, "APc": ap, "APf": ap, "APs": ap, "APm": ap}
    return {"majority": row, "hungarian": dict(row, AP=ap / 2), "oracle": dict(row, AP=1.0), "clusters": {"K": 40}}


def _rev(name: str, sha: str, metrics: dict | None) -> dict:
    eval_entry = {"data": metrics} if metrics else {"error": {"type": "FileNotFoundError", "msg": "no file"}}
    return {
        "rev": sha,
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"loss": {"hier": 0}}}},
            "metrics": {"metrics/eval.json": eval_entry},
        },
    }


SHOW = [  # the shape `dvc exp show --json` prints (dvc 3.x): workspace, then baselines with their experiments
    {"rev": "workspace", "name": None, "data": {}, "experiments": None},
    {
        "rev": "0" * 40,
        "name": "main",
        "data": {},
        "experiments": [
            {"revs": [_rev("tab-ours-s0", "a" * 40, _metrics(0.1))], "executor": None, "name": "tab-ours-s0"},
            {"revs": [_rev("tab-no-hier-s0", "b" * 40, _metrics(0.2))], "executor": None, "name": "tab-no-hier-s0"},
            {"revs": [_rev("tab-no-hier-s1", "d" * 40, _metrics(0.3))], "executor": None, "name": "tab-no-hier-s1"},
            {"revs": [_rev("broken", "c" * 40, None)], "executor": None, "name": "broken"},
        ],
    },
]


def test_experiments_from_show_reads_named_experiments_with_metrics():
    results = experiments_from_show(SHOW)
    assert set(results) == {"tab-ours-s0", "tab-no-hier-s0", "tab-no-hier-s1"}  # the one without metrics is out
    assert results["tab-no-hier-s0"].metrics["majority"]["AP"] == 0.2
    assert results["tab-no-hier-s0"].params == {"loss": {"hier": 0}}
    assert results["tab-ours-s0"].rev == "a" * 40


def test_table_rows_columns_and_missing_values():
    results = experiments_from_show(SHOW)
    rows = [Experiment("tab-no-hier", "without L_hier", {"loss.hier": "0"}), Experiment("tab-ours", "full model")]
    text = table(rows[:1], results, seeds=(0, 1), protocols=("majority", "hungarian"), keys=("AP", "AP50", "APr"))
    lines = text.splitlines()
    assert lines[0] == "| row | protocol | AP | AP50 | APr |"
    assert lines[2] == "| without L_hier | majority | 0.250 ± 0.071 | 0.500 ± 0.141 | n/a |"  # two seeds: 0.2, 0.3
    assert lines[3] == "| without L_hier | hungarian | 0.125 ± 0.035 | 0.500 ± 0.141 | n/a |"
    assert len(lines) == 2 + 2
    one = table(rows, results, seeds=(0,), protocols=("majority",), keys=("AP",)).splitlines()
    assert one[2:] == ["| without L_hier | majority | 0.200 |", "| full model | majority | 0.100 |"]
    text = provenance(rows[:1], results, (0, 1))
    assert "(`tab-no-hier`): loss.hier=0; seed 0: `bbbbbbb` k = 40, seed 1: `ddddddd` k = 40" in text


def test_provenance_gives_no_k_for_the_supervised_row():
    """The supervised baseline does not cluster: its workspace's clusters are the default run's, not its own."""
    run = ExperimentResult("tab-supervised-s0", "e" * 40, _metrics(0.2), {})
    text = provenance([SUPERVISED], {"tab-supervised-s0": run}, (0, 1, 2))
    assert text.endswith("(`tab-supervised`): none (params.yaml as committed); seed 0: `eeeeeee`")


def test_table_refuses_rows_that_did_not_run():
    with pytest.raises(PipelineError, match="tab-ours-s1"):
        table(TABLE2[-1:], experiments_from_show(SHOW), seeds=(0, 1))


def test_the_tables_hold_the_papers_rows():
    assert [e.overrides for e in TABLE2[:3]] == [{"loss.mask": "0"}, {"loss.object": "0"}, {"loss.hier": "0"}]
    assert TABLE2[-1].name == "tab-ours" and not TABLE2[-1].overrides
    assert Experiment("x", "x", {"embed.geometry": "euclidean"}).set_args() == ["-S", "embed.geometry=euclidean"]
    seeded = Experiment("x", "x", {"loss.hier": "0"}).seeded(2)
    assert seeded.name == "x-s2" and seeded.set_args() == [
        "-S",
        "loss.hier=0",
        "-S",
        "embed.seed=2",
        "-S",
        "cluster.seed=2",
    ]
    assert {"sample.backbone_init": "random"} in [e.overrides for e in TABLE1]
    assert TABLE1[0].set_args() == ["baselines/dvc.yaml"] and TABLE1[0].protocols == ("supervised",)


def test_compare_says_holds_fails_or_within_noise():
    from pipeline.experiments.report import compare

    results = experiments_from_show(SHOW)
    full, no_hier = Experiment("tab-ours", "full"), Experiment("tab-no-hier", "without L_hier")
    # one seed each: no noise, so any difference decides
    assert compare(no_hier, full, results, (0,), protocols=("majority",)) == "majority 0.200 vs 0.100 (holds)"
    assert compare(full, no_hier, results, (0,), protocols=("majority",)) == "majority 0.100 vs 0.200 (fails)"
    # two seeds of without L_hier (0.2, 0.3: std 0.071) against themselves: within noise
    assert "within noise" in compare(no_hier, no_hier, results, (0, 1), protocols=("majority",))


def test_supervised_row_reads_its_own_metrics_file_and_compares_rare_ap():
    from pipeline.experiments.report import SUPERVISED, compare_rare

    sup = {"supervised": {k: 0.5 for k in ("AP", "AP50", "AP75", "APc", "APf", "APs", "APm")} | {"APr": 0.05}}
    rev = _rev("tab-supervised-s0", "e" * 40, None)
    rev["data"]["metrics"]["metrics/supervised.json"] = {"data": sup}
    show = [{"rev": "main", "experiments": [{"revs": [rev]}, *SHOW[1]["experiments"]]}]
    results = experiments_from_show(show)
    assert results["tab-supervised-s0"].metrics["supervised"]["APr"] == 0.05
    line = table([SUPERVISED], results, seeds=(0, 1, 2), keys=("AP", "APr")).splitlines()[2]
    assert line == "| fully supervised Mask R-CNN | supervised | 0.500 | 0.050 |"  # one run, whatever the seeds
    ours = Experiment("tab-ours", "full")
    results["tab-ours-s0"].metrics["majority"]["APr"] = 0.08
    assert compare_rare(ours, SUPERVISED, results, (0,), protocols=("majority",)) == "majority 0.080 vs 0.050 (holds)"


def _results(aps: dict[str, list[float]]) -> dict:
    from pipeline.experiments.report import ExperimentResult

    return {
        f"{name}-s{seed}": ExperimentResult(f"{name}-s{seed}", "f" * 40, _metrics(ap), {})
        for name, values in aps.items()
        for seed, ap in enumerate(values)
    }


def test_ablation_order_against_the_papers():
    from pipeline.experiments.report import ablation_order

    rows = [
        Experiment("no-mask", "without L_mask"),
        Experiment("no-object", "without L_object"),
        Experiment("no-hier", "without L_hier"),
        Experiment("ours", "full model"),
    ]
    seeds = (0, 1)
    clear = _results({"no-object": [0.01, 0.02], "no-mask": [0.05, 0.06], "no-hier": [0.09, 0.10], "ours": [0.2, 0.2]})
    line = ablation_order(rows, clear, seeds, protocols=("majority",))
    assert line == (
        "majority: without L_object 0.015 < without L_mask 0.055 < without L_hier 0.095 < full model 0.200 (holds)"
    )
    close = dict(clear, **_results({"no-hier": [0.15, 0.25]}))  # right order, but hier's std covers the full model
    assert ablation_order(rows, close, seeds, protocols=("majority",)).endswith("(same order, within noise)")
    swapped = dict(clear, **_results({"no-hier": [0.3, 0.3]}))
    assert ablation_order(rows, swapped, seeds, protocols=("majority",)).endswith("(fails)")


def test_ratio_to_the_supervised_model_against_the_papers():
    from pipeline.experiments.report import SUPERVISED, compare_ratio

    results = _results({"ours": [0.10, 0.12]})
    results["tab-supervised-s0"] = results["ours-s0"].__class__(
        "tab-supervised-s0", "e" * 40, {"supervised": {"AP": 0.2}}, {}
    )
    ours = Experiment("ours", "full")
    # 0.11 / 0.2 = 0.55 ± 0.07: the published 0.54 is within one std
    assert compare_ratio(ours, SUPERVISED, results, (0, 1), protocols=("majority",)) == (
        "majority 0.55 ± 0.07 vs 0.54 (as published)"
    )
    results = _results({"ours": [0.02, 0.02]}) | {"tab-supervised-s0": results["tab-supervised-s0"]}
    assert compare_ratio(ours, SUPERVISED, results, (0, 1), protocols=("majority",)).endswith("(below)")


def test_rows_in_the_deep_world_are_named_apart():
    row = TABLE1[2].in_world({"data.synthetic.hierarchy": "deep"}, "-deep")
    assert row.name == "tab-ours-deep"
    assert row.overrides["data.synthetic.hierarchy"] == "deep"
    assert row.seeded(1).name == "tab-ours-deep-s1"
    assert TABLE1[2].in_world({}, "-deep") is TABLE1[2]


def test_report_only_reads_the_stages_each_row_ran_from_the_log():
    from stages.tables import parse_ran_log

    log = (
        "[tables] tab-ours-s0: dvc exp run -S embed.seed=0\n"
        "[tables] tab-ours-s0: ran nothing (all cached) in 4s\n"
        "noise\n"
        "[tables] tab-rand-init-s0: ran sample@train, sample@val, embed in 49s\n"
    )
    assert parse_ran_log(log) == {
        "tab-ours-s0": ([], 4.0),
        "tab-rand-init-s0": (["sample@train", "sample@val", "embed"], 49.0),
    }


def test_a_name_under_several_baselines_keeps_the_newest():
    newest = {"rev": "main", "experiments": [{"revs": [_rev("tab-ours-s0", "1" * 40, _metrics(0.4))]}]}
    older = {"rev": "old", "experiments": [{"revs": [_rev("tab-ours-s0", "2" * 40, _metrics(0.1))]}]}
    results = experiments_from_show([newest, older])
    assert results["tab-ours-s0"].rev == "1" * 40
