#!/usr/bin/env bash
# Create or reuse .venv at the repo root with the project installed (editable, with the dev extra, the
# pipeline extra: kfp for `mammoseg-pipeline` and its tests, and the openvino extra: the CPU engine
# whose variants export gates and predict runs), and the npm packages of the Data Docs.
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
# The CSS/JS that validate copies into its Data Docs (mammoseg/data_docs.py), at the versions and
# hashes package-lock.json pins; again only when the lock changed. No install scripts run: only files.
assets="$repo_root/mammoseg/data_docs_assets"
assets_stamp="$assets/node_modules/.mammoseg-installed"
want_assets="$(sha256sum "$assets/package-lock.json" | cut -d' ' -f1)"
if [ ! -f "$assets_stamp" ] || [ "$(cat "$assets_stamp")" != "$want_assets" ]; then
    command -v npm > /dev/null || { echo "venv.sh: npm not found (Debian package npm): it installs the Data Docs assets" >&2; exit 1; }
    npm ci --prefix "$assets" --ignore-scripts --no-audit --no-fund --loglevel=error > /dev/null
    echo "$want_assets" > "$assets_stamp"
fi
export PATH="$venv/bin:$PATH"
