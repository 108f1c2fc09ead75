"""The locked environment: requirements.lock agrees with pyproject.toml, and .venv is exactly the lock.

scripts/lock.sh writes the lock; scripts/venv.sh installs it (README, "The environment"). These fail when
pyproject's dependencies change without `scripts/lock.sh`, when the lock is edited by hand into something
pyproject does not allow, and when the venv running the tests holds other versions than the lock's.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("envlock", REPO / "scripts" / "envlock.py")
envlock = importlib.util.module_from_spec(_spec)
sys.modules["envlock"] = envlock  # dataclasses look their module up there
_spec.loader.exec_module(envlock)

LOCKED_EXTRAS = ["dev", "pipeline", "openvino", "gpu"]  # what scripts/lock.sh passes to pip-compile


@pytest.fixture(scope="module")
def lock() -> dict:
    return envlock.read_lock()


def _requirements(extras: list[str]) -> list[Requirement]:
    return [Requirement(r) for r in envlock.project_requirements(extras)]


def test_every_line_is_a_hashed_pin(lock):
    text = envlock.LOCK.read_text()
    assert "scripts/lock.sh" in text.splitlines()[4], "the header names the command that regenerates it"
    assert len(lock) > 100
    for entry in lock.values():
        assert entry.hashes, f"{entry.name} has no --hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in entry.hashes), entry.name
        assert entry.via, f"{entry.name}: no `# via` annotation (not written by pip-compile?)"
    # Nothing but pins, their hashes and comments: no URLs, no unhashed or editable lines.
    for line in text.splitlines():
        if line and not line.startswith("#") and not line[0].isspace():
            assert re.match(r"^[a-z0-9][a-z0-9._-]*==[^\s@]+ \\$", line), line
    assert "torch" not in lock and envlock.PROJECT not in lock


def test_lock_covers_pyproject_within_its_ranges(lock):
    for requirement in _requirements(LOCKED_EXTRAS):
        name = envlock.normalize(requirement.name)
        if name == "torch":
            version = envlock.torch_version()
        else:
            assert name in lock, f"{name} (pyproject.toml) is not in requirements.lock: run scripts/lock.sh"
            version = lock[name].version
        assert requirement.specifier.contains(Version(version), prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside pyproject's {requirement}: run scripts/lock.sh"
        )
        for extra in requirement.extras:  # e.g. mlflow[auth]: the extra's requirements are locked too
            dist_requirements = _locked_requirements_of(lock, name, extra)
            assert dist_requirements is None or all(n in lock or n == "torch" for n in dist_requirements)


def _locked_requirements_of(lock, name, extra):
    """The names `name[extra]` requires, where the running interpreter has `name` installed; else None."""
    try:
        requires = metadata.distribution(name).requires or []
    except metadata.PackageNotFoundError:
        return None
    environment = default_environment() | {"extra": extra}
    return {
        envlock.normalize(Requirement(r).name)
        for r in requires
        if Requirement(r).marker is not None and Requirement(r).marker.evaluate(environment)
    }


def test_lock_holds_nothing_pyproject_dropped(lock):
    direct = {envlock.normalize(r.name) for r in _requirements(LOCKED_EXTRAS)}
    for entry in lock.values():
        if any(via.startswith(f"{envlock.PROJECT} ") for via in entry.via):
            assert entry.name in direct, f"{entry.name}: locked for the project, which no longer requires it"
        parents = {envlock.parent_name(via) for via in entry.via} - {None}
        assert all(p in lock or p == "torch" for p in parents), f"{entry.name}: locked for {parents}"


def test_torch_pin_is_inside_pyproject_range():
    torch_range = next(r.specifier for r in _requirements([]) if r.name == "torch")
    assert torch_range.contains(Version(envlock.torch_version()))
    assert envlock.torch_requirement("cpu") == f"torch=={envlock.torch_version()}+cpu"
    assert envlock.torch_requirement("cuda").endswith(f",!={envlock.torch_version()}+cpu")


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_image_share_is_the_runtime_closure(lock, variant):
    names = {entry.name for entry in envlock.image_entries(variant, lock)}
    assert not names & {"pytest", "ruff", "moto", "kfp", "kfp-kubernetes", "psycopg"}  # docker: mlflow needs it
    assert {"mlflow", "dvc", "numpy", "sympy", "onnx"} <= names  # sympy: torch's own requirement
    if variant == "cpu":
        assert {"onnxruntime", "openvino"} <= names and "onnxruntime-gpu" not in names
    else:
        assert "onnxruntime-gpu" in names and not names & {"onnxruntime", "openvino"}
    # Closed: every requirement (markers evaluated) of an installed member is a member too.
    environment = default_environment() | {"extra": ""}
    for name in names:
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # onnxruntime-gpu: locked, never installed in .venv
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                child = envlock.normalize(requirement.name)
                assert child in names or child == "torch", f"the {variant} image has {name} without {child}"


def _in_project_venv() -> bool:
    return Path(sys.prefix).resolve() == (REPO / ".venv").resolve()


@pytest.mark.skipif(not _in_project_venv(), reason="runs in the .venv that scripts/venv.sh builds")
def test_venv_is_exactly_the_lock(lock):
    drift = []
    for entry in envlock.venv_entries(lock):
        try:
            installed = metadata.version(entry.name)
        except metadata.PackageNotFoundError:
            drift.append(f"{entry.name}: locked {entry.version}, not installed")
            continue
        if Version(installed) != Version(entry.version):
            drift.append(f"{entry.name}: locked {entry.version}, installed {installed}")
    drift += [f"{name}: installed, not in the lock" for name in envlock.extraneous(lock)]
    assert not drift, "the venv is not the lock (run scripts/venv.sh):\n" + "\n".join(drift)
    assert "onnxruntime-gpu" not in {envlock.normalize(d.metadata["Name"]) for d in metadata.distributions()}


@pytest.mark.skipif(not _in_project_venv(), reason="runs in the .venv that scripts/venv.sh builds")
def test_venv_torch_is_the_pinned_build():
    torch_version = Version(metadata.version("torch"))
    assert torch_version.public == envlock.torch_version()
    stamp = (REPO / ".venv" / ".mammoseg-installed").read_text()
    assert stamp.strip(), "venv.sh writes its stamp after a complete install"
    # The CPU build unless the venv was built with MAMMOSEG_TORCH_BUILD=cuda.
    if not any(d.metadata["Name"].startswith("nvidia-") for d in metadata.distributions() if d.metadata["Name"]):
        assert torch_version.local == "cpu"
