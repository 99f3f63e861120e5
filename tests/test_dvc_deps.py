"""Every stage's code deps in dvc.yaml are exactly the repo modules the stage imports, directly or not.

A module missing from them would leave `dvc repro` serving stale cached outputs after a change to it (say
pipeline/stores/store.py); a module listed but never imported (or a whole package listed) would re-run the stage,
and everything downstream, for a change that cannot affect it.
"""

import ast
import os
from pathlib import Path

import pytest
import yaml

from pipeline.geometry import kmeans_fused

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
# modules that load compiled code, and its C sources (setup.py's Extension): a stage importing one runs that code
NATIVE = {"pipeline/geometry/kmeans_fused.py": [f"pipeline/geometry/{name}" for name in kmeans_fused._SOURCES]}


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Repo modules imported by one file (absolute `import a.b` / `from a.b import c`, c possibly a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES and _module_file(name)}


def import_closure(module: str) -> set[Path]:
    """Files of `module` and of every repo module it imports, transitively (package __init__s included), with the C
    sources of the compiled code they load (`NATIVE`)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b runs a/__init__.py
        todo.extend(_imports(_module_file(name)))
    files = {_module_file(name).relative_to(ROOT) for name in seen}
    return files | {Path(source) for path in files for source in NATIVE.get(path.as_posix(), [])}


def _is_empty(path: Path) -> bool:
    """An empty package marker (no statements, or a docstring only) runs no code a stage could depend on."""
    if path.suffix != ".py":
        return False
    body = ast.parse((ROOT / path).read_text()).body
    return not body or (len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))


def _stages() -> list[tuple[str, str, list[str], str]]:
    """(dvc.yaml, stage, deps relative to the repo root, stage module) of every stage of both pipelines."""
    out = []
    for dvcfile in ("dvc.yaml", "baselines/dvc.yaml"):
        spec = yaml.safe_load((ROOT / dvcfile).read_text())
        wdir = Path(dvcfile).parent
        for name, stage in spec["stages"].items():
            stage = stage.get("do", stage)
            base = (wdir / stage.get("wdir", ".")).as_posix()
            module = stage["cmd"].split("python -m ")[1].split()[0]
            deps = [Path(os.path.normpath(Path(base, dep))).as_posix() for dep in stage.get("deps", [])]
            out.append((dvcfile, name, deps, module))
    return out


@pytest.mark.parametrize(("dvcfile", "stage", "deps", "module"), _stages(), ids=lambda v: str(v))
def test_stage_deps_cover_the_code_it_imports(dvcfile, stage, deps, module):
    def covered(path: Path) -> bool:
        return any(path.as_posix() == dep or path.as_posix().startswith(dep.rstrip("/") + "/") for dep in deps)

    missing = sorted(str(path) for path in import_closure(module) if not covered(path) and not _is_empty(path))
    assert not missing, f"{dvcfile} stage {stage!r} imports code it does not list in deps: {', '.join(missing)}"


@pytest.mark.parametrize(("dvcfile", "stage", "deps", "module"), _stages(), ids=lambda v: str(v))
def test_stage_deps_list_no_code_it_does_not_import(dvcfile, stage, deps, module):
    closure = {path.as_posix() for path in import_closure(module)}
    code = [dep for dep in deps if dep.split("/")[0] in PACKAGES]
    extra = sorted(dep for dep in code if dep not in closure)
    assert not extra, f"{dvcfile} stage {stage!r} lists code it never imports (or a whole package): {', '.join(extra)}"


def test_import_closure_follows_imports_transitively():
    closure = {path.as_posix() for path in import_closure("stages.cluster")}
    assert {
        "stages/cluster.py",
        "pipeline/geometry/kmeans.py",
        "stages/common.py",
        "pipeline/data/lvis_format.py",
    } <= closure
    assert "pipeline/models/proposer.py" not in closure  # only what is imported


def _params(dvcfile: str) -> dict[str, list[str]]:
    spec = yaml.safe_load((ROOT / dvcfile).read_text())
    return {name: stage.get("do", stage).get("params", []) for name, stage in spec["stages"].items()}


# the main stage of each params group that has speed-only fields
GROUP_STAGES = {"proposer": "train_proposer", "propose": "propose", "sample": "sample", "embed": "embed"}


@pytest.mark.parametrize("group", sorted(GROUP_STAGES))
def test_a_stage_lists_every_param_of_its_group_but_the_speed_only_ones(group):
    """A speed-only param (num_workers, checkpoint_every) re-runs nothing when changed; every other one of the
    group is listed, so a param added to the group is not forgotten in dvc.yaml."""
    import dataclasses

    from pipeline.config import Params, speed_only

    group_type = type(getattr(Params(), group))
    fields = {f.name for f in dataclasses.fields(group_type)}
    assert speed_only(group_type)
    declared = {k.split(".", 1)[1] for k in _params("dvc.yaml")[GROUP_STAGES[group]] if k.startswith(f"{group}.")}
    assert declared == fields - set(speed_only(group_type))


@pytest.mark.parametrize("dvcfile", ["dvc.yaml", "baselines/dvc.yaml"])
def test_no_stage_lists_a_speed_only_param_or_a_whole_group_holding_one(dvcfile):
    from pipeline.config import Params, speed_only

    for stage, keys in _params(dvcfile).items():
        for key in keys:
            group, _, name = key.partition(".")
            value = getattr(Params(), group, None)
            if value is not None and hasattr(value, "__dataclass_fields__") and speed_only(type(value)):
                assert name and name not in speed_only(type(value)), f"{dvcfile} stage {stage!r} lists {key!r}"


def test_native_sources_are_setup_pys():
    """`NATIVE` (kmeans_fused's sources, whose hash it checks a build against) lists exactly the C files setup.py
    compiles (its SOURCES: the Extension's sources and depends, hashed in the same order)."""
    files: list[str] = []
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCES" for t in node.targets):
            files.extend(ast.literal_eval(node.value))
    assert files == [source for sources in NATIVE.values() for source in sources]
    assert all((ROOT / source).is_file() for source in files)
