"""How much the main job's outcome depends on its seeds (one table): the README's main job on fresh clones.

For each variant (by default train.seed 0, 1 and 2, and synth.seed 1: another generated dataset) this
clones the repository at HEAD's commit into --work/<variant>, changes that one value in the clone's
params.yaml and runs the README's main job there (`bash scripts/main.sh`: venv, generated data, dvc repro,
registration), its log in --work/<variant>.log. The table reads each clone's metrics: the native mean Dice
per image of each class with its 95% patient-bootstrap CI, the lower bound of the paired U-Net - baseline
CI, the best epoch, the registry's decision and the wall time. Runs go one after another (each takes the
machine's cores: ~25 min on 2 AVX512-BF16 cores); --table-only reads clones an earlier call left.

    python benchmarks/seeds.py [--work /tmp/mammoseg-seeds] [--variant synth.seed=2 ...] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = ("train.seed=0", "train.seed=1", "train.seed=2", "synth.seed=1")
TARGETS = ("mass", "calcification", "all")
# Written into each clone at the start and the end of its main job, so --table-only knows which metrics
# that job wrote: the clone holds the committed metrics too, which a failed run would leave in place.
RECORD_FILE = "seeds-run.json"


def set_param(params_text: str, dotted: str) -> str:
    """Return params.yaml's text with one stage value replaced, its comments and layout kept.

    Args:
        params_text: the file's text.
        dotted: STAGE.KEY=VALUE, a scalar key directly under a top-level stage block.

    Raises:
        ValueError: the assignment is malformed, or the stage block holds no such key.
    """
    match = re.fullmatch(r"(\w+)\.(\w+)=(\S+)", dotted)
    if match is None:
        raise ValueError("expected STAGE.KEY=VALUE")
    stage, key, value = match.groups()
    block = re.search(rf"^{stage}:\n((?:[ #].*\n|\n)*)", params_text, re.MULTILINE)
    if block is None:
        raise ValueError(f"params.yaml has no {stage} block")
    line = re.compile(rf"^(  {key}:[ ]*)([^#\n]*?)([ \t]*(?:#.*)?)$", re.MULTILINE)
    found = line.search(params_text, block.start(1), block.end(1))
    if found is None:
        raise ValueError(f"params.yaml's {stage} block has no {key}")
    return params_text[:found.start(2)] + value + params_text[found.end(2):]


def run_variant(work: Path, variant: str, commit: str) -> None:
    """Clone the commit into work/<variant>, apply the variant and run the main job there."""
    clone = work / variant
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO_ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", commit], check=True)
    params = clone / "params.yaml"
    params.write_text(set_param(params.read_text(), variant))
    record = {"variant": variant, "commit": commit, "started": time.time()}
    (clone / RECORD_FILE).write_text(json.dumps(record) + "\n")
    with open(work / f"{variant}.log", "w") as log:
        done = subprocess.run(["bash", "scripts/main.sh"], cwd=clone, stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    record.update(seconds=round(time.time() - record["started"]), returncode=done.returncode)
    (clone / RECORD_FILE).write_text(json.dumps(record) + "\n")


def _row(clone: Path) -> list[str]:
    """One table row from the metrics a clone's main job wrote; what is missing where it wrote none."""
    blank = ["-"] * 6
    try:
        record = json.loads((clone / RECORD_FILE).read_text())
    except FileNotFoundError:
        return ["-", f"no {RECORD_FILE}: not run by this script", *blank[1:]]
    if "returncode" not in record:
        return [record["commit"][:7], "running (or stopped)", *blank[1:]]
    names = ("evaluate.json", "train.json", "registration.json")
    paths = [clone / "metrics" / name for name in names]
    stale = [path.name for path in paths if not path.exists() or path.stat().st_mtime < record["started"]]
    if record["returncode"] != 0 or stale:
        problem = f"main job exit {record['returncode']}" + (f"; not written: {', '.join(stale)}" if stale else "")
        return [record["commit"][:7], problem, *blank[1:]]
    evaluation, training, registration = (json.loads(path.read_text()) for path in paths)
    cells = []
    for target in TARGETS:
        unet = evaluation["native"]["unet"]["mean_image"][target]
        lower = evaluation["paired_unet_vs_baseline"]["mean_image"][target]["ci95"][0]
        cells.append(f"{unet['value']:.3f} [{unet['ci95'][0]:.3f}, {unet['ci95'][1]:.3f}] {lower:+.3f}")
    decision = "@champion" if registration.get("promoted") else "not promoted"
    return [record["commit"][:7], *cells, str(training["best_epoch"]), decision, f"{record['seconds'] / 60:.1f}"]


def main() -> None:
    """Run the variants (unless --table-only) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mammoseg-seeds"))
    parser.add_argument("--variant", action="append", help="STAGE.KEY=VALUE (repeatable); default: "
                        + ", ".join(DEFAULT_VARIANTS))
    parser.add_argument("--table-only", action="store_true", help="read the clones in --work, run nothing")
    args = parser.parse_args()
    variants = args.variant or list(DEFAULT_VARIANTS)
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    if not args.table_only:
        # Every variant checked before the first run: a typo found after an hour of main jobs costs that hour.
        params_text = (REPO_ROOT / "params.yaml").read_text()
        for variant in variants:
            try:
                set_param(params_text, variant)
            except ValueError as exc:
                raise SystemExit(f"--variant {variant}: {exc}") from None
        args.work.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            if (args.work / variant).exists():
                raise SystemExit(f"{args.work / variant}: exists; remove it or pass --table-only")
        for variant in variants:
            run_variant(args.work, variant, commit)

    print("The main job on fresh clones: native mean Dice per image [95% CI] and the lower bound of the paired")
    print("U-Net - baseline CI, per class; best epoch; registry decision; wall minutes (venv build included)")
    header = ["variant", "commit", *TARGETS, "best epoch", "registry", "min"]
    rows = [[variant, *_row(args.work / variant)] for variant in variants]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
