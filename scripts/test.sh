#!/usr/bin/env bash
# The test command: lint, then the whole suite (slow tests included). Creates or reuses .venv/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
ruff check .
exec python -m pytest "$@"
