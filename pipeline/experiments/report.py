"""The paper's tables from DVC experiments: which experiments to run, and their metrics as Markdown.

Every number comes from `dvc exp show --json` of experiments that ran; nothing is computed here but
formatting, means and standard deviations. An experiment is a name and a set of `-S key=value` param
overrides on top of params.yaml; each row runs once per seed (`embed.seed` and `cluster.seed`: the
global `seed` regenerates the world itself, so it stays fixed).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

AP_KEYS = ("AP", "AP50", "AP75", "APr", "APc", "APf", "APs", "APm", "APl")
PROTOCOLS = ("majority", "hungarian", "oracle")
# metrics file -> the key its content goes under (None: merged at the top level)
METRICS_FILES = {"metrics/eval.json": None, "metrics/supervised.json": None, "metrics/propose_val.json": "proposals"}
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Experiment:
    name: str  # the DVC experiment name, also the row's key in the report
    label: str
    overrides: dict[str, str] = field(default_factory=dict)  # param -> value, as given to `dvc exp run -S`
    target: str | None = None  # the dvc.yaml to run (None: the default DAG)
    protocols: tuple[str, ...] | None = None  # the metric rows it has (None: majority, hungarian, oracle)
    seeds: tuple[int, ...] | None = None  # None: every seed of the report

    def set_args(self) -> list[str]:
        args = [arg for key, value in self.overrides.items() for arg in ("-S", f"{key}={value}")]
        return args + ([self.target] if self.target else [])

    def in_world(self, overrides: Mapping[str, str], suffix: str) -> Experiment:
        """The same row in another world: `overrides` (e.g. data.synthetic.hierarchy=deep) added, the name
        suffixed so that both worlds' experiments can be kept side by side."""
        if not overrides:
            return self
        merged = {**self.overrides, **overrides}
        return Experiment(f"{self.name}{suffix}", self.label, merged, self.target, self.protocols, self.seeds)

    def seeded(self, seed: int) -> Experiment:
        """The same row with the embedding and clustering seeds set to `seed`."""
        overrides = {**self.overrides, "embed.seed": str(seed), "cluster.seed": str(seed)}
        return Experiment(f"{self.name}-s{seed}", self.label, overrides, self.target, self.protocols, self.seeds)


# Table 1: random-init backbone, ours; hyperbolic against Euclidean. Table 2: the loss ablation.
SUPERVISED = Experiment(  # its randomness is the global seed (the proposer's training): one run
    "tab-supervised", "fully supervised Mask R-CNN", {}, "baselines/dvc.yaml", ("supervised",), (0,)
)
TABLE1 = (
    SUPERVISED,
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

    dvc lists the newest baseline first: a name found under several baselines (`dvc exp show -n N`) keeps the
    newest baseline's experiment.

    The metrics of METRICS_FILES are merged (majority/hungarian/oracle from eval.json, supervised from
    supervised.json, the val proposals' recall under "proposals"); experiments with none readable are
    left out (their `error` says why).
    """
    found: dict[str, ExperimentResult] = {}
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                data = rev.get("data") or {}
                metrics = {}
                for name, key in METRICS_FILES.items():
                    content = (data.get("metrics") or {}).get(name, {}).get("data") or {}
                    if content:
                        metrics.update({key: content} if key else content)
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                if rev.get("name") and metrics.keys() - {"proposals"} and rev["name"] not in found:
                    found[rev["name"]] = ExperimentResult(rev["name"], rev["rev"], metrics, params)
    return found


def cell(values: Sequence[float | None]) -> str:
    """'mean ± std' (sample std) of the defined values, 'mean' for one, 'n/a' for none."""
    defined = [v for v in values if v is not None]
    if not defined:
        return "n/a"
    if len(defined) == 1:
        return f"{defined[0]:.3f}"
    return f"{statistics.mean(defined):.3f} ± {statistics.stdev(defined):.3f}"


def seed_runs(row: Experiment, results: Mapping[str, ExperimentResult], seeds: Sequence[int]) -> list[ExperimentResult]:
    names = [row.seeded(seed).name for seed in (row.seeds or seeds)]
    missing = [name for name in names if name not in results]
    if missing:
        raise PipelineError(f"no metrics for experiment(s) {', '.join(missing)}: did they run?")
    return [results[name] for name in names]


def table(
    rows: Sequence[Experiment],
    results: Mapping[str, ExperimentResult],
    seeds: Sequence[int] = SEEDS,
    protocols: Sequence[str] = PROTOCOLS,
    keys: Sequence[str] = AP_KEYS,
) -> str:
    """A Markdown table: one line per (row, protocol), each cell the mean ± std over `seeds`."""
    head = "| row | protocol | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for row in rows:
        runs = seed_runs(row, results, seeds)
        for protocol in row.protocols or protocols:
            cells = " | ".join(cell([run.metrics[protocol].get(k) for run in runs]) for k in keys)
            lines.append(f"| {row.label} | {protocol} | {cells} |")
    return "\n".join(lines)


def provenance(rows: Sequence[Experiment], results: Mapping[str, ExperimentResult], seeds: Sequence[int]) -> str:
    """One line per row: its changed params, and per seed the experiment's commit and k (for the rows that
    cluster: the supervised baseline's workspace holds the default run's clusters, not its own)."""
    lines = []
    for row in rows:
        runs = seed_runs(row, results, seeds)
        changed = ", ".join(f"{k}={v}" for k, v in row.overrides.items()) or "none (params.yaml as committed)"
        clusters = row.protocols != SUPERVISED.protocols
        per_seed = ", ".join(
            f"seed {seed}: `{run.rev[:7]}`" + (f" k = {run.metrics.get('clusters', {}).get('K')}" if clusters else "")
            for seed, run in zip(row.seeds or seeds, runs, strict=True)
        )
        lines.append(f"- {row.label} (`{row.name}`): {changed}; {per_seed}")
    return "\n".join(lines)


def mean_std(runs: Sequence[ExperimentResult], protocol: str, key: str = "AP") -> tuple[float, float]:
    values = [run.metrics[protocol][key] for run in runs]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _verdict(protocol: str, ours: float, theirs: float, noise: float) -> str:
    """'holds' / 'fails' when `ours` is above / below `theirs` by more than `noise`, else 'within noise'."""
    verdict = "holds" if ours - theirs > noise else "fails" if theirs - ours > noise else "within noise"
    return f"{protocol} {ours:.3f} vs {theirs:.3f} ({verdict})"


def compare(
    better: Experiment,
    worse: Experiment,
    results: Mapping[str, ExperimentResult],
    seeds: Sequence[int],
    protocols: Sequence[str] = ("majority", "hungarian"),
) -> str:
    """Whether `better` has the higher mean AP than `worse` under each protocol, and by how many stds.

    'holds' when the mean is higher by more than the larger of the two standard deviations, 'within
    noise' when the difference is smaller than that, 'fails' when it is lower by more than that.
    """
    better_runs, worse_runs = seed_runs(better, results, seeds), seed_runs(worse, results, seeds)
    parts = []
    for protocol in protocols:
        (m1, s1), (m2, s2) = mean_std(better_runs, protocol), mean_std(worse_runs, protocol)
        parts.append(_verdict(protocol, m1, m2, max(s1, s2)))
    return "; ".join(parts)


def compare_rare(
    ours: Experiment,
    supervised: Experiment,
    results: Mapping[str, ExperimentResult],
    seeds: Sequence[int],
    protocols: Sequence[str] = ("majority", "hungarian"),
) -> str:
    """APr of ours under each protocol against the supervised model's, with the same verdict rule as `compare`."""
    theirs = seed_runs(supervised, results, seeds)[0].metrics["supervised"]["APr"]
    if theirs is None:
        return "the supervised model's APr is undefined"
    ours_runs = seed_runs(ours, results, seeds)
    parts = []
    for protocol in protocols:
        mean, std = mean_std(ours_runs, protocol, "APr")
        parts.append(_verdict(protocol, mean, theirs, std))
    return "; ".join(parts)


PAPER_AP = {"ours": 0.109, "supervised": 0.201}  # LVIS v1, DESIGN.md's published reference
PAPER_ABLATION = {"without L_object": 0.0374, "without L_mask": 0.0689, "without L_hier": 0.0846, "full model": 0.1086}


def compare_ratio(
    ours: Experiment,
    supervised: Experiment,
    results: Mapping[str, ExperimentResult],
    seeds: Sequence[int],
    protocols: Sequence[str] = ("majority", "hungarian"),
) -> str:
    """Our AP over the supervised model's, per protocol (mean ± std over the seeds), against the paper's
    0.109 / 0.201 = 0.54: 'as published' when 0.54 lies within one std of the mean ratio."""
    theirs = seed_runs(supervised, results, seeds)[0].metrics["supervised"]["AP"]
    paper = PAPER_AP["ours"] / PAPER_AP["supervised"]
    if not theirs:
        return "the supervised model's AP is 0 or undefined"
    runs = seed_runs(ours, results, seeds)
    parts = []
    for protocol in protocols:
        mean, std = mean_std(runs, protocol)
        ratio, noise = mean / theirs, std / theirs
        verdict = "as published" if abs(ratio - paper) <= noise else "above" if ratio > paper else "below"
        parts.append(f"{protocol} {ratio:.2f} ± {noise:.2f} vs {paper:.2f} ({verdict})")
    return "; ".join(parts)


def ablation_order(
    rows: Sequence[Experiment],
    results: Mapping[str, ExperimentResult],
    seeds: Sequence[int],
    protocols: Sequence[str] = ("majority", "hungarian"),
) -> str:
    """The rows ranked by mean AP per protocol, against the paper's ranking (PAPER_ABLATION, by label):
    'holds' when the ranks agree and every step between neighbours exceeds the larger std of the two,
    'same order, within noise' when the ranks agree but a step does not, else 'fails'."""
    paper = sorted((r for r in rows if r.label in PAPER_ABLATION), key=lambda r: PAPER_ABLATION[r.label])
    parts = []
    for protocol in protocols:
        stats = {r.label: mean_std(seed_runs(r, results, seeds), protocol) for r in paper}
        found = sorted(paper, key=lambda r: stats[r.label][0])
        steps = [
            stats[b.label][0] - stats[a.label][0] > max(stats[a.label][1], stats[b.label][1])
            for a, b in zip(found, found[1:], strict=False)
        ]
        same = [r.label for r in found] == [r.label for r in paper]
        verdict = ("holds" if all(steps) else "same order, within noise") if same else "fails"
        ranking = " < ".join(f"{r.label} {stats[r.label][0]:.3f}" for r in found)
        parts.append(f"{protocol}: {ranking} ({verdict})")
    return "; ".join(parts)
