#!/usr/bin/env bash
# The main job: the whole pipeline on generated INbreast-format data, with the embedded defaults
# (SQLite MLflow store and local artifacts under artifacts/). Creates or reuses .venv/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh

# Generated data stands in for the licensed INbreast; real data goes in the same place (README).
if [ ! -f data/inbreast/INbreast.csv ] && [ ! -f data/inbreast/INbreast.xls ]; then
    mammoseg synth --out data/inbreast
fi
# The pipeline: every stage of dvc.yaml, each `mammoseg <stage>`; reruns only what changed.
dvc repro
# What it shipped: native Dice per class with CIs, U-Net against the baseline, the registry's decision.
mammoseg job-summary --metrics metrics/evaluate.json --registration metrics/registration.json
