"""Read requirements.lock (pip-compile's output, see scripts/lock.sh) for venv.sh, build_image.sh and the tests.

Standard library only, so it runs under any Python 3.11 before a venv exists.

    python scripts/envlock.py venv                 the lock's entries that .venv installs (all but onnxruntime-gpu)
    python scripts/envlock.py image cpu|cuda       the runtime subset that the image of that variant installs
    python scripts/envlock.py extraneous           run by the venv's python: installed distributions that are in
                                                   neither the lock nor torch's own requirements (to uninstall)
    python scripts/envlock.py torch cpu|cuda       the torch requirement of that build, from requirements-torch.txt
    python scripts/envlock.py pins                 the lock as name==version constraints (no hashes), for the
                                                   CUDA build of torch, whose own requirements pip resolves

Each of venv and image prints lock entries verbatim (name==version and its --hash lines), so the output is
itself a requirements file for `pip install --require-hashes --no-deps`.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
TORCH = REPO / "requirements-torch.txt"
PROJECT = "mammoseg"
# The GPU image's ONNX Runtime: locked (the gpu extra) but never installed beside onnxruntime, whose
# import name it shares. The venv and the CPU image take onnxruntime, the CUDA image onnxruntime-gpu.
GPU_ONLY = {"onnxruntime-gpu"}
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Entry:
    """One pinned package of the lock: its text (requirement and hashes), version and parents."""

    name: str
    version: str
    text: list[str]
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def read_lock(path: Path = LOCK) -> dict[str, Entry]:
    """Parse pip-compile's output: `name==version` lines, their `--hash=` lines and `# via` annotations."""
    entries: dict[str, Entry] = {}
    current: Entry | None = None
    in_via = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not line[0].isspace() and not line.startswith("#"):
            requirement = stripped.rstrip("\\").strip()
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", requirement)
            if not match:
                raise ValueError(f"{path}: not a pin: {line!r}")
            current = Entry(normalize(match.group(1)), match.group(2), [line])
            entries[current.name] = current
            in_via = False
        elif current is not None and stripped.startswith("--hash="):
            current.text.append(line)
            current.hashes.append(stripped.rstrip("\\").strip().removeprefix("--hash="))
        elif current is not None and stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                current.via.append(rest)
        elif current is not None and in_via and stripped.startswith("#   "):
            current.via.append(stripped.removeprefix("#").strip())
        else:
            in_via = False
    return entries


def parent_name(via: str) -> str | None:
    """The package a `# via` annotation names; None for the project itself, files and constraints."""
    match = _NAME.match(via)
    if via.startswith("-") or not match or normalize(match.group(1)) == PROJECT:
        return None
    return normalize(match.group(1))


def project_requirements(extras: list[str]) -> list[str]:
    """The dependencies of pyproject.toml plus the named extras' (references to the project itself expanded)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    requirements = list(project["dependencies"])
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            if normalize(_NAME.match(requirement).group(1)) == PROJECT:
                pending += re.search(r"\[([^\]]*)\]", requirement).group(1).replace(" ", "").split(",")
            else:
                requirements.append(requirement)
    return requirements


def closure(entries: dict[str, Entry], roots: set[str], exclude: set[str]) -> list[Entry]:
    """The lock's entries reachable from roots along the `# via` edges (a parent needs its children).

    The edges of pip-compile's annotations carry no extras, so this is the exact runtime set or, where a
    package is also required with an extra elsewhere in the lock, a small superset of it.
    """
    selected = {name for name in roots if name not in exclude}
    changed = True
    while changed:
        changed = False
        for entry in entries.values():
            if entry.name in selected or entry.name in exclude:
                continue
            if any(parent_name(via) in selected for via in entry.via):
                selected.add(entry.name)
                changed = True
    return [entry for entry in entries.values() if entry.name in selected]


def image_entries(variant: str, entries: dict[str, Entry] | None = None) -> list[Entry]:
    """The runtime subset of the lock for the image: dependencies + openvino (cpu) or + gpu (cuda).

    The CPU image also runs the TrainJob launcher (python -m pipelines.trainjob), so it takes the
    pipeline extra's kubeflow SDK, without kfp.
    """
    entries = read_lock() if entries is None else entries
    extras = ["openvino"] if variant == "cpu" else ["gpu"]
    roots = {normalize(_NAME.match(r).group(1)) for r in project_requirements(extras)}
    if variant == "cpu":
        roots.add("kubeflow")
    exclude = {"onnxruntime"} if variant == "cuda" else set(GPU_ONLY)
    return closure(entries, roots, exclude)


def venv_entries(entries: dict[str, Entry] | None = None) -> list[Entry]:
    """What .venv installs: the whole lock but the GPU image's onnxruntime-gpu."""
    entries = read_lock() if entries is None else entries
    return [entry for entry in entries.values() if entry.name not in GPU_ONLY]


def torch_version() -> str:
    """The version of torch in requirements-torch.txt (its only requirement line)."""
    for line in TORCH.read_text().splitlines():
        match = re.match(r"^torch==([0-9][^\s;+]*)\s*$", line.strip())
        if match:
            return match.group(1)
    raise ValueError(f"{TORCH}: no torch==VERSION line")


def torch_requirement(build: str) -> str:
    """The requirement that picks torch's CPU build (the +cpu local version) or its CUDA build."""
    version = torch_version()
    if build == "cpu":
        return f"torch=={version}+cpu"
    if build == "cuda":
        return f"torch=={version},!={version}+cpu"
    raise ValueError(f"torch build must be cpu or cuda, not {build!r}")


def extraneous(entries: dict[str, Entry] | None = None) -> list[str]:
    """Installed distributions (of the running interpreter) that neither the lock nor torch accounts for."""
    from importlib import metadata

    entries = read_lock() if entries is None else entries
    keep = {e.name for e in venv_entries(entries)} | {PROJECT, "torch", "pip"}
    installed = {normalize(d.metadata["Name"]): d for d in metadata.distributions() if d.metadata["Name"]}
    # torch's own requirements stay (the CUDA build's nvidia-* and triton are not in the lock).
    pending = ["torch"]
    while pending:
        dist = installed.get(pending.pop())
        for requirement in (dist.requires or []) if dist else []:
            if ";" in requirement and "extra ==" in requirement:
                continue
            name = normalize(_NAME.match(requirement).group(1))
            if name not in keep:
                keep.add(name)
                pending.append(name)
    return sorted(name for name in installed if name not in keep)


def main(argv: list[str]) -> int:
    """The command line: see the module's docstring."""
    command, *args = argv or ["help"]
    if command == "venv":
        lines = [line for entry in venv_entries() for line in entry.text]
    elif command == "image" and args and args[0] in ("cpu", "cuda"):
        lines = [line for entry in image_entries(args[0]) for line in entry.text]
    elif command == "extraneous":
        lines = extraneous()
    elif command == "pins":
        lines = [f"{entry.name}=={entry.version}" for entry in venv_entries()]
    elif command == "torch" and args:
        lines = [torch_requirement(args[0])]
    else:
        sys.stderr.write(__doc__)
        return 2
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
