"""sweep: choose the embedded world's defaults by a one-knob-at-a-time `dvc exp` sweep (`make sweep`).

Runs every point of `pipeline.experiments.sweep.KNOBS` as `dvc exp run --temp` on the sweep world (global seed 1, not
the tables' world), once per embedding/clustering seed; reads the metrics back from `dvc exp show --json`
and writes reports/sweep.md: one table per knob, the value the rule chooses, and whether params.yaml
agrees. It never edits params.yaml: a disagreement is reported, for a person to commit.

The stages each experiment ran and its wall time are recorded in reports/sweep_runs.json, so that
`--report-only --baseline <commit>` can rewrite the report from the experiments of an earlier commit
without running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from pipeline.config import ParamsLoader
from pipeline.errors import PipelineError
from pipeline.experiments.report import SEEDS, experiments_from_show
from pipeline.experiments.sweep import KNOBS, SWEEP_WORLD, choose, experiments, geometry_by_dim, knob_table
from pipeline.stores.store import atomic_path, write_json
from stages.common import clean_errors
from stages.experiments import dvc, git, run_experiment

REPORT = Path("reports/sweep.md")
RUNS = Path("reports/sweep_runs.json")  # per experiment: the stages that ran and the seconds it took


@clean_errors
def main(
    out: Path = typer.Option(REPORT, help="where to write the report"),
    seeds: int = typer.Option(len(SEEDS), help="seeds per point (embed.seed = cluster.seed = 0, 1, ...)"),
    knob: list[str] = typer.Option([], help="sweep only these knobs (slugs); default: all"),
    dry_run: bool = typer.Option(False, help="list the experiments and exit"),
    report_only: bool = typer.Option(False, help="run nothing: rewrite the report from experiments that ran"),
    baseline: str = typer.Option("HEAD", help="the commit the experiments were run from (for --report-only)"),
) -> None:
    commit = git("rev-parse", "--short", baseline)
    text = git("show", f"{commit}:params.yaml") if report_only else Path("params.yaml").read_text()
    params = yaml.load(text, Loader=ParamsLoader)  # YAML 1.2 floats (1e-4), as the stages read them
    unknown = set(knob) - {k.slug for k in KNOBS}
    if unknown:
        raise PipelineError(f"unknown knob(s) {', '.join(sorted(unknown))} (known: {', '.join(k.slug for k in KNOBS)})")
    knobs = [k for k in KNOBS if not knob or k.slug in knob]
    seed_list = tuple(range(seeds))
    runs = [exp.seeded(seed) for exp in experiments(knobs, params) for seed in seed_list]
    if dry_run:
        for exp in runs:
            print(f"{exp.name}: dvc exp run {' '.join(exp.set_args())}")
        return
    ran = _read_runs(RUNS) if RUNS.is_file() or report_only else {}
    if not report_only:
        for i, exp in enumerate(runs, 1):
            print(f"[sweep {i}/{len(runs)}] {exp.name}: dvc exp run {' '.join(exp.set_args())}", flush=True)
            ran[exp.name] = run_experiment(exp)
            stages, seconds = ran[exp.name]
            done = ", ".join(stages) or "nothing (all cached)"
            print(f"[sweep {i}/{len(runs)}] {exp.name}: ran {done} in {seconds:.0f}s", flush=True)
            _write_runs(RUNS, ran)  # after each run: an interrupted sweep keeps its record
    total = sum(ran[exp.name][1] for exp in runs if exp.name in ran)
    results = experiments_from_show(json.loads(dvc("exp", "show", "--json", "--rev", baseline)))

    choices = {k.slug: choose(k, params, results, seed_list) for k in knobs if k.choose}
    summary = "\n".join(
        f"| {k.label} | {k.criterion} AP | {choices[k.slug].default} | {choices[k.slug].value} | "
        f"{'**change params.yaml**' if choices[k.slug].changes_default else 'yes'} |"
        for k in knobs
        if k.choose
    )
    sections = []
    for k in knobs:
        choice = choices.get(k.slug)
        verdict = "Diagnostic: chooses nothing."
        if choice:
            verdict = f"Chosen: **{choice.value}**. {choice.reason[0].upper()}{choice.reason[1:]}."
        fixed = "".join(f", `{key}={value}`" for key, value in k.fixed.items())
        sections.append(
            f"### {k.label}\n\n`-S {'=<value> -S '.join(k.params)}=<value>`{fixed}\n\n"
            f"{knob_table(k, params, results, seed_list, choice.value if choice else None)}\n\n{verdict}"
        )
    by_slug = {k.slug: k for k in knobs}
    geometry = (
        geometry_by_dim(by_slug["dim"], by_slug["euclidean-dim"], params, results, seed_list)
        if {"dim", "euclidean-dim"} <= by_slug.keys()
        else "(not swept)"
    )
    stages_ran = "\n".join(
        f"- `{exp.name}`: {', '.join(ran[exp.name][0]) or 'nothing, all restored from the run cache'} "
        f"({ran[exp.name][1]:.0f} s)"
        if exp.name in ran
        else f"- `{exp.name}`: (not recorded)"
        for exp in runs
    )
    world = ", ".join(f"`{key}={value}`" for key, value in SWEEP_WORLD.items())
    text = f"""# Defaults sweep on the embedded world

Written by `make sweep`: {len(runs)} experiments that took {total / 60:.1f} min on this machine (run from commit
`{commit}`, whose params.yaml the "params.yaml" column shows). One knob at a time
around params.yaml, every point over {len(seed_list)} seeds of the embedding and the clustering (`embed.seed` =
`cluster.seed` = {", ".join(map(str, seed_list))}); each cell is the mean ± sample standard deviation. The sweep
runs on another world ({world}) than the tables (`seed=0`), so the defaults are not tuned on the val split
the tables are scored on. Rule: a knob keeps its params.yaml value unless another value's mean AP is higher
by more than the larger standard deviation of the two. The AP is the majority protocol's, except for k:
majority AP rises with the number of clusters whatever the embedding (one cluster per proposal would score
as the oracle), so k is judged by the one-to-one hungarian AP. Every number is read from
`dvc exp show --json`.

| knob | judged by | params.yaml | sweep's choice | params.yaml agrees |
|---|---|---|---|---|
{summary}

## Per knob

{chr(10).join(s + chr(10) for s in sections)}
## Hyperbolic against Euclidean at each dimension (sweep world)

{geometry}

## Stages each experiment ran

The rest were restored from DVC's run cache.

{stages_ran}
"""
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)


def _read_runs(path: Path) -> dict[str, tuple[list[str], float]]:
    """The stages and seconds of each experiment, as the sweeps so far recorded them."""
    try:
        data = json.loads(path.read_text())
        return {name: (list(stages), float(seconds)) for name, (stages, seconds) in data.items()}
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; --report-only needs the record of a sweep that ran") from None
    except (ValueError, TypeError, AttributeError) as err:
        raise PipelineError(f"{path}: not a sweep record ({type(err).__name__}: {err})") from None


def _write_runs(path: Path, ran: dict[str, tuple[list[str], float]]) -> None:
    write_json(path, {name: [stages, round(seconds, 1)] for name, (stages, seconds) in ran.items()})


if __name__ == "__main__":
    typer.run(main)
