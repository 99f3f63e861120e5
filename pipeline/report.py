"""The paper's tables from DVC experiments: which experiments to run, and their metrics as Markdown.

Every number comes from `dvc exp show --json` of experiments that ran; nothing is computed here but
formatting. An experiment is a name and a set of `-S key=value` param overrides on top of params.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

AP_KEYS = ("AP", "AP50", "AP75", "APr", "APc", "APf", "APs", "APm", "APl")
PROTOCOLS = ("majority", "hungarian", "oracle")


@dataclass(frozen=True)
class Experiment:
    name: str  # the DVC experiment name (exp-<name>), also the row's label in the report
    label: str
    overrides: dict[str, str] = field(default_factory=dict)  # param -> value, as given to `dvc exp run -S`

    def set_args(self) -> list[str]:
        return [arg for key, value in self.overrides.items() for arg in ("-S", f"{key}={value}")]


# Table 1: random-init backbone, ours; hyperbolic against Euclidean. Table 2: the loss ablation.
TABLE1 = (
    Experiment("tab-rand-init", "ours, rand. init. backbone", {"sample.backbone_init": "random"}),
    Experiment("tab-ours", "ours (hyperbolic)"),
    Experiment("tab-euclidean", "ours, Euclidean", {"embed.geometry": "euclidean"}),
)
TABLE2 = (
    Experiment("tab-no-mask", "without L_mask", {"loss.mask": "0"}),
    Experiment("tab-no-object", "without L_object", {"loss.object": "0"}),
    Experiment("tab-no-hier", "without L_hier", {"loss.hier": "0"}),
    Experiment("tab-ours", "full model"),
)


@dataclass
class ExperimentResult:
    name: str
    rev: str
    metrics: dict  # the content of metrics/eval.json
    params: dict  # the content of params.yaml


def experiments_from_show(show: Sequence[Mapping]) -> dict[str, ExperimentResult]:
    """Named experiments of `dvc exp show --json` (any baseline), with their eval metrics and params.

    Experiments whose metrics/eval.json could not be read are left out (their `error` says why).
    """
    found: dict[str, ExperimentResult] = {}
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("metrics/eval.json", {}).get("data")
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                if rev.get("name") and metrics:
                    found[rev["name"]] = ExperimentResult(rev["name"], rev["rev"], metrics, params)
    return found


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(
    rows: Sequence[Experiment],
    results: Mapping[str, ExperimentResult],
    protocols: Sequence[str] = PROTOCOLS,
    keys: Sequence[str] = AP_KEYS,
) -> str:
    """A Markdown table: one line per (experiment, protocol), the AP columns, the experiment's commit."""
    missing = [row.name for row in rows if row.name not in results]
    if missing:
        raise PipelineError(f"no metrics for experiment(s) {', '.join(missing)}: did they run?")
    head = "| row | protocol | " + " | ".join(keys) + " | experiment |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for row in rows:
        result = results[row.name]
        for protocol in protocols:
            values = " | ".join(_cell(result.metrics[protocol].get(k)) for k in keys)
            lines.append(f"| {row.label} | {protocol} | {values} | `{result.rev[:7]}` |")
    return "\n".join(lines)


def provenance(rows: Sequence[Experiment], results: Mapping[str, ExperimentResult]) -> str:
    """One line per experiment: its commit, its changed params, and k."""
    lines = []
    for row in rows:
        result = results[row.name]
        changed = ", ".join(f"{k}={v}" for k, v in row.overrides.items()) or "none (params.yaml as committed)"
        clusters = result.metrics.get("clusters", {})
        lines.append(
            f"- `{row.name}` ({result.rev[:7]}): {changed}; k = {clusters.get('K')} ({clusters.get('k_choice')})"
        )
    return "\n".join(lines)
