#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml: every package that the project, its dev, pipeline,
# openvino and gpu extras and torch's CPU build need, each pinned with the sha256 of every file of that
# release on the index (pip-compile --generate-hashes), except torch itself (pinned by version in
# requirements-torch.txt: its CPU and CUDA builds are different files). Run it after changing
# pyproject.toml's dependencies or requirements-torch.txt, then commit both files and the new lock;
# tests/test_environment.py fails while the lock and pyproject disagree.
#
#   scripts/lock.sh             resolve the newest versions inside pyproject's ranges
#   scripts/lock.sh --upgrade-package NAME   (or any other pip-compile option) passed on to pip-compile
#
# Needs a package index (pip's own configuration applies: index, extra indexes, find-links, CA bundle)
# that serves torch's CPU build; where the default index would bring the CUDA build, name the CPU
# wheels' index in MAMMOSEG_TORCH_INDEX (for PyTorch's own: https://download.pytorch.org/whl/cpu).
# pip-tools runs from its own pinned venv under build/ (git-ignored), never from .venv.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
tools="$repo_root/build/lock-tools"
mkdir -p build
[ -f build/.gitignore ] || echo '*' > build/.gitignore
if [ ! -x "$tools/bin/pip-compile" ]; then
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet "pip==26.3" "pip-tools==7.6.2"
fi
torch_cpu="$(python3 scripts/envlock.py torch cpu)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
echo "$torch_cpu" > "$scratch/torch-cpu.txt"
index_args=()
[ -z "${MAMMOSEG_TORCH_INDEX:-}" ] || index_args=(--extra-index-url "$MAMMOSEG_TORCH_INDEX")
# --unsafe-package torch: torch is resolved (so its dependencies are locked) but left out of the file.
# No index or find-links lines in the output: the lock names files by hash, not by where they came from.
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras \
    --extra dev --extra pipeline --extra openvino --extra gpu --unsafe-package torch \
    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    --constraint "$scratch/torch-cpu.txt" "${index_args[@]}" \
    --output-file requirements.lock "$@" pyproject.toml
# Two entries pip-compile writes that are not pins: the project itself (the dev extra's mammoseg[stack]
# names it, as an unhashable file:// URL) and the warning that torch is unpinned (on purpose).
python3 - requirements.lock <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
text = re.sub(r"# WARNING: pip install will require the following package to be hashed\.\n(#.*\n)*"
              r"mammoseg @ \S+\n(    #.*\n)*", "", text)
text = re.sub(r"\n# WARNING: The following packages were not pinned(.*\n)*# torch\n?$",
              "\n# torch: not here but in requirements-torch.txt (its CPU and CUDA builds are different files)\n", text)
open(path, "w").write(text)
PY
echo "lock.sh: requirements.lock: $(grep -c -E '^[A-Za-z0-9]' requirements.lock) packages (torch: $torch_cpu, outside)" >&2
