#!/usr/bin/env bash
# Create or reuse .venv at the repo root with the project installed (editable, with the dev extra, the
# pipeline extra: kfp for `mammoseg-pipeline` and its tests, and the openvino extra: the CPU engine
# whose variants export gates and predict runs).
# Sourced by scripts/main.sh and scripts/test.sh. The CPU build of torch is installed first so the
# project's torch range is already satisfied and pip never resolves it to a multi-GB CUDA wheel.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.mammoseg-installed"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Reinstall only when the dependency declaration changed since the last install.
want="$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet -e "$repo_root[dev,pipeline,openvino]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
