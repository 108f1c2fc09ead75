"""dvc.yaml as the design document: each stage's deps cover the project code it runs.

A stage's command is `mammoseg <stage>`, which runs mammoseg/stages/<stage>.py through the CLI. Every
project module reachable from those by import (at module level or inside a function, as the code
imports lazily) must be a dep, as a file or through a folder dep, or changing it would not re-run
the stage and dvc.lock would describe other code.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

PROJECT_PACKAGES = ("mammoseg", "model")
# The CLI's own modules run for every stage: argument parsing and params loading.
CLI_MODULES = ("mammoseg/cli.py", "mammoseg/config.py")
# Deps that are data, produced by stages or pulled by DVC: absent on a fresh clone.
DATA_PREFIXES = ("artifacts/", "data/", "metrics/")


def _module_file(name: str) -> Path | None:
    """Return the source file of a project module name, or None when it is not ours."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """Project files that one file imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*parts, module] if module else parts)
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        for name in names:
            while name:
                file = _module_file(name)
                if file is not None:
                    found.add(file)
                    break
                name = name.rpartition(".")[0]
    return found


def imported_closure(start: Path) -> set[Path]:
    """Every project file reachable from start by imports, start included."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path) - seen)
    return seen


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _covered(file: Path, deps: list[str]) -> bool:
    relative = file.relative_to(REPO_ROOT).as_posix()
    # Package markers hold no logic of a stage; a stage depends on the modules beside them.
    if file.name == "__init__.py" and not file.read_text().strip().replace('"""', "").strip():
        return True
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_stage_declares_the_project_code_it_imports(stage):
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in _stages()[stage]["deps"]]
    stage_module = REPO_ROOT / "mammoseg" / "stages" / f"{stage}.py"
    assert stage_module.is_file(), stage_module
    code = imported_closure(stage_module)
    missing = sorted(file.relative_to(REPO_ROOT).as_posix() for file in code if not _covered(file, deps))
    missing += [module for module in CLI_MODULES if module not in deps]
    assert not missing, f"dvc.yaml stage {stage} lacks deps: {', '.join(sorted(set(missing)))}"


def test_the_walk_sees_imports_inside_functions():
    """cli imports job_summary inside a function only; the walk must still see it (a mutation check)."""
    closure = {p.relative_to(REPO_ROOT).as_posix() for p in imported_closure(REPO_ROOT / "mammoseg" / "cli.py")}
    assert "mammoseg/job_summary.py" in closure


def test_dvc_lock_describes_the_committed_code_and_params():
    """dvc.lock must come from a run of this very code (the README's numbers come from that run).

    `dvc status` compares each stage's recorded deps with the checkout: code, params and commands
    must match; data deps and outs are absent on a fresh clone and are not judged here.
    """
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    stale = []
    for stage, changes in json.loads(result.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                stale.append(f"{stage}: {change}")  # "changed command", "always changed"
                continue
            for path, state in change.get("changed deps", {}).items():
                if not path.startswith(DATA_PREFIXES) or not isinstance(state, str):
                    stale.append(f"{stage}: {path} {state}")
    assert not stale, ("dvc.lock is stale; run the main job on a clean clone and commit its dvc.lock: "
                       + "; ".join(stale))
