"""`mammoseg job-summary`: what the main job shipped, on one screen (reads evaluate's and register's JSON).

Native Dice per class with patient-bootstrap intervals for the U-Net, the threshold baseline and the
resolution ceiling; the paired U-Net-minus-baseline difference; detection; the registered version and
whether it became champion, and why. `scripts/main.sh` ends with it; the README copies its numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mammoseg.errors import UserError

_TARGETS = ("mass", "calcification", "all")


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found (run the pipeline first: `dvc repro`)") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _cell(entry: dict[str, Any]) -> str:
    value, (low, high) = entry["value"], entry["ci95"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def render(metrics: dict[str, Any], registration: dict[str, Any] | None) -> str:
    """Return the summary text (plain, fixed-width, at most ~30 lines)."""
    native = metrics["native"]
    lines = [f"mammoseg main job: test split of {metrics['images']} images, {metrics['patients']} patients "
             "(native DICOM grid, mean Dice per image, 95% patient-bootstrap CI)", "",
             f"{'target':<14}{'U-Net':<24}{'baseline':<24}{'U-Net - baseline (paired)':<28}{'ceiling':<8}"]
    for target in _TARGETS:
        paired = metrics["paired_unet_vs_baseline"]["mean_image"][target]
        difference = f"{paired['difference']:+.3f} [{paired['ci95'][0]:+.3f}, {paired['ci95'][1]:+.3f}]"
        lines.append(f"{target:<14}{_cell(native['unet']['mean_image'][target]):<24}"
                     f"{_cell(native['baseline']['mean_image'][target]):<24}{difference:<28}"
                     f"{native['ceiling']['mean_image'][target]['value']:.3f}")
    lines += ["", f"pooled Dice, all lesions: U-Net {_cell(native['unet']['pooled']['all'])}, "
              f"baseline {_cell(native['baseline']['pooled']['all'])}",
              f"mass Dice on mass-positive images: U-Net {_cell(native['unet']['mass_positive'])}", ""]
    for name, values in metrics["detection"].items():
        froc = values["froc"]
        lines.append(f"detection {name:<13} (IoU >= {values['min_iou']}): sensitivity {values['sensitivity']:.2f} at "
                     f"{values['false_positives_per_image']:.2f} FP/image; FROC {froc['sensitivity_at_0.5_fp']:.2f} "
                     f"@0.5 FP, {froc['sensitivity_at_1_fp']:.2f} @1 FP")
    if registration is not None:
        alias = "@champion" if registration["promoted"] else "@challenger only"
        lines += ["", f"registered: {registration['name']} version {registration['version']} -> {alias}",
                  f"why: {registration['decision']}"]
    return "\n".join(lines) + "\n"


def run(metrics: Path, registration: Path | None) -> str:
    """Read the two files and return the summary text."""
    return render(_read(metrics, "evaluate's metrics"),
                  None if registration is None else _read(registration, "register's decision"))
