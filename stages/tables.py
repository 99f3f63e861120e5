"""tables: run the paper's comparisons as DVC experiments and write reports/tables.md (`make tables`).

Each row is `dvc exp run --temp -n <name> -S key=value ...`: it runs in a temporary copy, and every stage
whose deps and params did not change is restored from the run cache instead of re-running. The report
lists, per row, the stages that really ran and the wall time; every number is read back from
`dvc exp show --json`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import typer

from pipeline.errors import PipelineError
from pipeline.experiments.report import (
    SEEDS,
    TABLE1,
    TABLE2,
    Experiment,
    ablation_order,
    compare,
    compare_rare,
    compare_ratio,
    experiments_from_show,
    provenance,
    table,
)
from pipeline.stores.store import atomic_path
from stages.common import clean_errors
from stages.experiments import dvc, run_experiment

REPORT = Path("reports/tables.md")
WORLDS = {  # the synthetic world each report is made on: param overrides, experiment-name suffix, report
    "default": ({}, "", REPORT),
    "deep": ({"data.synthetic.hierarchy": "deep"}, "-deep", Path("reports/tables_deep.md")),
}
WORLD_TEXT = {
    "default": "the embedded world (params.yaml as committed)",
    "deep": "the deeper world (`data.synthetic.hierarchy=deep`: shape families, object > part > sub-part)",
}


def make_command(world: str) -> str:
    """The make target that runs a world's rows."""
    return "make tables" if world == "default" else f"make tables-{world}"


def paper_claims(
    table1: tuple[Experiment, ...], table2: tuple[Experiment, ...], results: dict, seeds: tuple[int, ...]
) -> str:
    """Each claim of the paper with its verdict under majority and hungarian, as a Markdown list."""
    supervised, rand_init, ours, euclidean = table1
    return "\n".join(
        [f"- full model above {row.label}: {compare(ours, row, results, seeds)}" for row in table2[:3]]
        + [
            "- ablation order as published (without L_object < without L_mask < without L_hier < full): "
            f"{ablation_order(table2, results, seeds)}",
            f"- hyperbolic at least as good as Euclidean: {compare(ours, euclidean, results, seeds)}",
            f"- a trained backbone above a random one: {compare(ours, rand_init, results, seeds)}",
            f"- ours above a fully supervised Mask R-CNN on rare categories (APr): "
            f"{compare_rare(ours, supervised, results, seeds)}",
            "- our AP over the fully supervised Mask R-CNN's near the published 0.109 / 0.201 = 0.54: "
            f"{compare_ratio(ours, supervised, results, seeds)}",
        ]
    )


def parse_ran_log(log: str) -> dict[str, tuple[list[str], float]]:
    """The `[tables] <name>: ran <stages> in <N>s` lines of a run's output: name -> (stages, seconds)."""
    ran = {}
    for m in re.finditer(r"^\[tables\] (\S+): ran (.*) in (\d+)s$", log, re.M):
        stages = [] if m[2].startswith("nothing") else m[2].split(", ")
        ran[m[1]] = (stages, float(m[3]))
    return ran


@clean_errors
def main(
    world: str = typer.Option("default", help="default | deep: the synthetic world the rows run on"),
    out: Path | None = typer.Option(None, help="where to write the report (default: reports/tables[_deep].md)"),
    seeds: int = typer.Option(len(SEEDS), help="seeds per row (embed.seed = cluster.seed = 0, 1, ...)"),
    report_only: bool = typer.Option(False, help="run nothing: write the report from the experiments recorded"),
    commits: int = typer.Option(
        1,
        help="read the experiments of the last N commits (newest wins), e.g. 2 when a "
        "commit was made while the rows ran",
    ),
    ran_log: Path | None = typer.Option(
        None, help="with --report-only: the log of the run that made the rows, for the stages each ran and its time"
    ),
) -> None:
    if world not in WORLDS:
        raise PipelineError(f"--world must be one of {', '.join(WORLDS)}, got {world!r}")
    overrides, suffix, default_out = WORLDS[world]
    out = out or default_out
    started = time.perf_counter()
    seed_list = tuple(range(seeds))
    table1 = tuple(row.in_world(overrides, suffix) for row in TABLE1)
    table2 = tuple(row.in_world(overrides, suffix) for row in TABLE2)
    rows: dict[str, Experiment] = {}
    for exp in (*table1, *table2):
        rows.setdefault(exp.name, exp)
    runs = [row.seeded(seed) for row in rows.values() for seed in (row.seeds or seed_list)]
    ran: dict[str, tuple[list[str], float]] = {}
    for exp in [] if report_only else runs:
        name = exp.name
        print(f"[tables] {name}: dvc exp run {' '.join(exp.set_args()) or '(params.yaml as committed)'}", flush=True)
        ran[name] = run_experiment(exp)
        print(f"[tables] {name}: ran {', '.join(ran[name][0]) or 'nothing (all cached)'} in {ran[name][1]:.0f}s")
    if report_only and ran_log is not None:
        ran = parse_ran_log(ran_log.read_text())
    results = experiments_from_show(json.loads(dvc("exp", "show", "--json", "-n", str(commits))))
    total = time.perf_counter() - started
    claims = paper_claims(table1, table2, results, seed_list)
    others = []
    for other, (other_overrides, other_suffix, other_out) in WORLDS.items():
        if other == world:
            continue
        other1 = tuple(row.in_world(other_overrides, other_suffix) for row in TABLE1)
        other2 = tuple(row.in_world(other_overrides, other_suffix) for row in TABLE2)
        try:
            text = paper_claims(other1, other2, results, seed_list)
        except PipelineError as err:  # that world's rows did not run (or not from these commits)
            text = f"- not available: {err} (run `{make_command(other)}`)"
        others.append(f"### On {WORLD_TEXT[other]} (`{other_out}`)\n\n{text}")
    claims += "\n\n" + "\n\n".join(others) if others else ""
    stages_ran = "\n".join(
        f"- `{name}`: {', '.join(stages) or 'nothing, all restored from the run cache'} ({seconds:.0f} s)"
        for name, (stages, seconds) in ran.items()
    )
    command = make_command(world)
    if report_only:
        made = sum(seconds for _, seconds in ran.values())
        written = (
            f"Rows run by `{command}` ({made / 60:.1f} min of experiments on this machine, from the log of that "
            "run); this report written from the recorded experiments with `--report-only`."
        )
    else:
        written = f"Written by `{command}` in {total / 60:.1f} min on this machine."
    text = f"""# The paper's tables on {WORLD_TEXT[world]}

{written} Each cell is the mean ± sample standard
deviation over {len(seed_list)} seeds of the embedding and the clustering (`embed.seed` = `cluster.seed` =
{", ".join(map(str, seed_list))}); the world (global `seed` 0) and the proposer (`proposer.seed` 0) are the same for
every row.
The fully supervised Mask R-CNN (every train category's labels, the proposer's architecture and schedule,
`baselines/dvc.yaml`) depends on the global seed only: one run. Every number below is read from
`dvc exp show --json`.

## Table 1: supervised; ours with a random or a trained backbone; hyperbolic against Euclidean

{table(table1, results, seed_list)}

## Table 2: loss ablation

{table(table2, results, seed_list, protocols=("majority", "hungarian"), keys=("AP", "AP50", "AP75"))}

## The paper's claims

AP means over the seeds; a claim "holds" when the difference exceeds the larger standard deviation. First on
this world, then on the other one when its rows are recorded.

{claims}

## Provenance

{provenance(list(rows.values()), results, seed_list)}

Stages each row ran (the rest were restored from DVC's run cache):

{stages_ran}
"""
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    typer.run(main)
