"""The defaults sweep: how params.yaml's defaults for the embedded world were chosen, as `dvc exp` runs.

One knob at a time around params.yaml (a full grid would not fit 2 cores), each point over the tables'
embedding/clustering seeds. The sweep runs on a *different* world from the one the tables report (global
`seed` 1, where the tables use 0): the defaults are chosen on data the tables never score, so the tables
are not tuned on their own val split.

The rule: a knob keeps its params.yaml value unless another value's mean AP is higher by more than the
larger of the two standard deviations (the tables' verdict rule). The AP is the majority protocol's, the
paper's headline, except for the number of clusters: majority AP rises with k by construction (with one
cluster per proposal it is the oracle's), so k is judged by the one-to-one hungarian protocol, which
over-clustering cannot game. Diagnostic knobs (`choose` is False) are reported but choose nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.errors import PipelineError
from pipeline.experiments.report import Experiment, ExperimentResult, cell, compare, mean_std, seed_runs

SWEEP_WORLD = {"seed": "1"}  # the global seed of the world the defaults are chosen on (the tables use 0)
PREFIX = "sweep"


@dataclass(frozen=True)
class Knob:
    slug: str  # part of the experiment names
    label: str
    params: tuple[str, ...]  # dotted params set together to each value
    values: tuple[str, ...]  # in order of cost, cheapest first
    fixed: dict[str, str] = field(default_factory=dict)  # other overrides held for every point of this knob
    choose: bool = True  # False: a diagnostic, reported but not used to choose a default
    criterion: str = "majority"  # the protocol whose mean AP chooses the value

    def default(self, params: Mapping) -> str:
        """The knob's value in params.yaml (all its params must agree)."""
        found = {_as_value(_lookup(params, key)) for key in self.params}
        if len(found) != 1:
            raise PipelineError(
                f"params.yaml: {', '.join(self.params)} differ ({', '.join(sorted(found))}); "
                "the sweep sets them together"
            )
        return found.pop()

    def points(self, params: Mapping) -> tuple[str, ...]:
        """The values swept: `values`, plus params.yaml's value when it is not among them."""
        default = self.default(params)
        return self.values if default in self.values else (*self.values, default)


KNOBS = (
    Knob("dim", "embedding dimension (`embed.dim`)", ("embed.dim",), ("2", "8", "16", "32", "64", "128", "256")),
    Knob("epochs", "embedding epochs (`embed.epochs`)", ("embed.epochs",), ("10", "30", "60", "100")),
    Knob(
        "k",
        "number of clusters (`cluster.k`)",
        ("cluster.k",),
        ("auto", "20", "30", "40", "60", "80"),
        criterion="hungarian",  # majority AP grows with k whatever the embedding (see the module docstring)
    ),
    Knob("crop", "crop size (`sample.crop_size`)", ("sample.crop_size",), ("32", "64", "96")),
    Knob(
        "backbone",
        "backbone (`proposer.backbone` = `sample.backbone`)",
        ("proposer.backbone", "sample.backbone"),
        ("resnet18", "resnet50"),
    ),
    Knob("proposer-epochs", "proposer epochs (`proposer.epochs`)", ("proposer.epochs",), ("4", "8")),
    Knob(
        "euclidean-dim",
        "Euclidean embedding dimension (`embed.dim`, `embed.geometry=euclidean`; diagnostic)",
        ("embed.dim",),
        ("2", "8", "32", "128", "256"),
        fixed={"embed.geometry": "euclidean"},
        choose=False,
    ),
)
BASE = Experiment(f"{PREFIX}-base", "params.yaml", dict(SWEEP_WORLD))


def _lookup(params: Mapping, dotted: str) -> object:
    node: object = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise PipelineError(f"params.yaml: no param {dotted!r}")
        node = node[part]
    return node


def _as_value(value: object) -> str:
    """A param value as `dvc exp run -S` would write it (so 32 and '32' compare equal)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def point(knob: Knob, value: str, params: Mapping) -> Experiment:
    """The experiment of one knob value: BASE when it is params.yaml's value and nothing else is fixed."""
    if value == knob.default(params) and not knob.fixed:
        return BASE
    overrides = {**SWEEP_WORLD, **knob.fixed, **dict.fromkeys(knob.params, value)}
    return Experiment(f"{PREFIX}-{knob.slug}-{value}", f"{knob.slug} = {value}", overrides)


def experiments(knobs: Sequence[Knob], params: Mapping) -> list[Experiment]:
    """Every distinct experiment of the knobs, BASE first (it runs the whole pipeline on the sweep world)."""
    found = {BASE.name: BASE}
    for knob in knobs:
        for value in knob.points(params):
            exp = point(knob, value, params)
            found.setdefault(exp.name, exp)
    return list(found.values())


@dataclass(frozen=True)
class Choice:
    value: str
    default: str
    reason: str

    @property
    def changes_default(self) -> bool:
        return self.value != self.default


def choose(knob: Knob, params: Mapping, results: Mapping[str, ExperimentResult], seeds: Sequence[int]) -> Choice:
    """The knob's value by the module's rule: params.yaml's unless another beats it by more than noise."""
    default, protocol = knob.default(params), knob.criterion
    scores = {
        value: mean_std(seed_runs(point(knob, value, params), results, seeds), protocol)
        for value in knob.points(params)
    }
    best = max(scores, key=lambda value: scores[value][0])  # ties: the first, i.e. the cheapest
    (best_mean, best_std), (default_mean, default_std) = scores[best], scores[default]
    if best == default:
        return Choice(default, default, f"the params.yaml value has the highest {protocol} AP ({default_mean:.3f})")
    margin = max(best_std, default_std)
    if best_mean - default_mean > margin:
        reason = f"{protocol} AP {best_mean:.3f} against {default_mean:.3f} for {default}, above the noise "
        reason += f"({margin:.3f})"
        return Choice(best, default, reason)
    reason = (
        f"by {protocol} AP the best, {best} ({best_mean:.3f}), is within noise ({margin:.3f}) of the params.yaml "
        f"value ({default_mean:.3f}), which stays"
    )
    return Choice(default, default, reason)


def _values(runs: Sequence[ExperimentResult], *path: str) -> list[float | None]:
    out = []
    for run in runs:
        node: object = run.metrics
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        out.append(node if isinstance(node, int | float) else None)
    return out


COLUMNS = (  # (header, path into the merged metrics)
    ("majority AP", ("majority", "AP")),
    ("majority APr", ("majority", "APr")),
    ("hungarian AP", ("hungarian", "AP")),
    ("hungarian APr", ("hungarian", "APr")),
    ("oracle AP", ("oracle", "AP")),
    ("novel recall@20", ("proposals", "recall@20/novel")),
    ("k", ("clusters", "K")),
)


def knob_table(
    knob: Knob, params: Mapping, results: Mapping[str, ExperimentResult], seeds: Sequence[int], chosen: str | None
) -> str:
    """One line per value: mean ± std over `seeds` of each column; params.yaml's value and the choice marked."""
    default = knob.default(params)
    lines = ["| value | " + " | ".join(head for head, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for value in knob.points(params):
        runs = seed_runs(point(knob, value, params), results, seeds)
        marks = [mark for mark, on in (("params.yaml", value == default), ("**chosen**", value == chosen)) if on]
        name = f"{value} ({', '.join(marks)})" if marks else value
        cells = []
        for _, path in COLUMNS:
            values = _values(runs, *path)
            if path[0] == "clusters":  # k is an integer: its mean, no spread
                defined = [v for v in values if v is not None]
                cells.append(f"{statistics.mean(defined):.0f}" if defined else "n/a")
            else:
                cells.append(cell(values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def geometry_by_dim(
    hyperbolic: Knob, euclidean: Knob, params: Mapping, results: Mapping[str, ExperimentResult], seeds: Sequence[int]
) -> str:
    """Hyperbolic against Euclidean at every dimension both knobs swept, with the tables' verdict rule."""
    dims = [value for value in hyperbolic.points(params) if value in euclidean.points(params)]
    return "\n".join(
        f"- dim {dim}: hyperbolic vs Euclidean, "
        f"{compare(point(hyperbolic, dim, params), point(euclidean, dim, params), results, seeds)}"
        for dim in dims
    )
