"""sweep: choose the embedded world's defaults by a one-knob-at-a-time `dvc exp` sweep (`make sweep`).

Runs every point of `pipeline.sweep.KNOBS` as `dvc exp run --temp` on the sweep world (global seed 1, not
the tables' world), once per embedding/clustering seed; reads the metrics back from `dvc exp show --json`
and writes reports/sweep.md: one table per knob, the value the rule chooses, and whether params.yaml
agrees. It never edits params.yaml: a disagreement is reported, for a person to commit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
import yaml

from pipeline.errors import PipelineError
from pipeline.report import SEEDS, experiments_from_show
from pipeline.sweep import KNOBS, SWEEP_WORLD, choose, experiments, geometry_by_dim, knob_table
from stages.common import clean_errors
from stages.experiments import dvc, run_experiment

REPORT = Path("reports/sweep.md")


@clean_errors
def main(
    out: Path = typer.Option(REPORT, help="where to write the report"),
    seeds: int = typer.Option(len(SEEDS), help="seeds per point (embed.seed = cluster.seed = 0, 1, ...)"),
    knob: list[str] = typer.Option([], help="sweep only these knobs (slugs); default: all"),
    dry_run: bool = typer.Option(False, help="list the experiments and exit"),
) -> None:
    started = time.perf_counter()
    params = yaml.safe_load(Path("params.yaml").read_text())
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
    ran: dict[str, tuple[list[str], float]] = {}
    for i, exp in enumerate(runs, 1):
        print(f"[sweep {i}/{len(runs)}] {exp.name}: dvc exp run {' '.join(exp.set_args())}", flush=True)
        ran[exp.name] = run_experiment(exp)
        stages, seconds = ran[exp.name]
        print(
            f"[sweep {i}/{len(runs)}] {exp.name}: ran {', '.join(stages) or 'nothing (all cached)'} in {seconds:.0f}s"
        )
    results = experiments_from_show(json.loads(dvc("exp", "show", "--json")))
    total = time.perf_counter() - started

    choices = {k.slug: choose(k, params, results, seed_list) for k in knobs if k.choose}
    summary = "\n".join(
        f"| {k.label} | {choices[k.slug].default} | {choices[k.slug].value} | "
        f"{'**change params.yaml**' if choices[k.slug].changes_default else 'yes'} |"
        for k in knobs
        if k.choose
    )
    sections = []
    for k in knobs:
        choice = choices.get(k.slug)
        verdict = f"Chosen: **{choice.value}**. {choice.reason}." if choice else "Diagnostic: chooses nothing."
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
        f"- `{name}`: {', '.join(stages) or 'nothing, all restored from the run cache'} ({seconds:.0f} s)"
        for name, (stages, seconds) in ran.items()
    )
    world = ", ".join(f"`{key}={value}`" for key, value in SWEEP_WORLD.items())
    text = f"""# Defaults sweep on the embedded world

Written by `make sweep` in {total / 60:.1f} min on this machine ({len(runs)} experiments). One knob at a time
around params.yaml, every point over {len(seed_list)} seeds of the embedding and the clustering (`embed.seed` =
`cluster.seed` = {", ".join(map(str, seed_list))}); each cell is the mean ± sample standard deviation. The sweep
runs on another world ({world}) than the tables (`seed=0`), so the defaults are not tuned on the val split
the tables are scored on. Rule: a knob keeps its params.yaml value unless another value's mean majority AP
is higher by more than the larger standard deviation of the two. Every number is read from
`dvc exp show --json`.

| knob | params.yaml | sweep's choice | params.yaml agrees |
|---|---|---|---|
{summary}

## Per knob

{chr(10).join(s + chr(10) for s in sections)}
## Hyperbolic against Euclidean at each dimension (sweep world)

{geometry}

## Stages each experiment ran

The rest were restored from DVC's run cache.

{stages_ran}
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)


if __name__ == "__main__":
    typer.run(main)
