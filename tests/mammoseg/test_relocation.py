"""Self-contained artifacts: moved elsewhere, with the old place gone, every next stage still runs.

A cluster gives each task its declared input artifacts at paths of its own, and nothing else. Here,
before every stage, each artifact folder so far is copied to a fresh root (each into a folder of its
own, under another name) and the old root is deleted; the stage then runs from the copies. Its
outputs must equal those of the same stage run where its inputs were written (where the outputs are
deterministic: prepared_data is that run), and no output may name a path of any root.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mammoseg.stages.ingest import rejected_list_path
from mammoseg.synth import IMAGE_SIZES, scaled_size
from tests.conftest import FAST_EXPORT, TINY_TRAIN, stage_config_for, tree_digest

pytestmark = pytest.mark.slow

MANIFEST_FILE = "manifest.parquet"
# prepared_data's dataset (synth at scale 0.1, 8 patients): its own sizes, fewer images than INbreast.
SIZES = [scaled_size(rows, columns, 0.1) for rows, columns in IMAGE_SIZES]
VALIDATE = {"allowed_sizes": [f"{r}x{c}" for r, c in SIZES], "min_images": 8, "min_patients": 3, "workers": 1}


class Artifacts:
    """Artifact folders by name, all under one root that `move` replaces by a fresh one."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.moves = 0
        self.root = base / "root0"
        self.folders: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        return self.folders[name]

    def add(self, name: str, source: Path | None = None) -> Path:
        """Register the folder of a new artifact (a copy of `source`, or empty for a stage to fill)."""
        folder = self.root / "new" / name
        if source is not None:
            shutil.copytree(source, folder)
        self.folders[name] = folder
        return folder

    def move(self) -> None:
        """Copy every artifact folder to a fresh root, each in a folder and under a name of its own; delete the old."""
        self.moves += 1
        root = self.base / f"root{self.moves}"
        for index, name in enumerate(sorted(self.folders)):
            target = root / str(index) / f"{name}-{self.moves}"
            shutil.copytree(self.folders[name], target)
            self.folders[name] = target
        shutil.rmtree(self.root)
        self.root = root


def _files_naming(folder: Path, needles: set[str]) -> list[str]:
    """The files under folder whose content names any of the needles."""
    found = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        parquet = file.suffix == ".parquet"  # compressed: read its values
        text = pd.read_parquet(file).astype(str).to_csv().encode() if parquet else file.read_bytes()
        if any(needle.encode() in text for needle in needles):
            found.append(file.relative_to(folder).as_posix())
    return found


def _summary(report: Path) -> dict:
    """validate's summary.json without its clock reading."""
    summary = json.loads((report / "summary.json").read_text())
    summary.pop("run_time")
    return summary


def test_each_stage_runs_from_moved_copies_of_its_inputs(prepared_data, tracking_env, tmp_path):
    from mammoseg.stages import evaluate, export, ingest, preprocess, register, train, validate

    artifacts = Artifacts(tmp_path / "moved")
    artifacts.add("inbreast", prepared_data.inbreast)
    roots = {str(tmp_path / "moved"), str((tmp_path / "moved").resolve()), str(prepared_data.inbreast.parent)}

    artifacts.move()
    manifest, masks = artifacts.add("manifest") / MANIFEST_FILE, artifacts.add("masks")
    ingest.run(stage_config_for("ingest", workers=1), artifacts["inbreast"], manifest, masks)
    # The same bytes as ingest where the data was written: no path of either place inside.
    assert tree_digest(manifest.parent) == {
        MANIFEST_FILE: tree_digest(prepared_data.manifest)[""],
        rejected_list_path(manifest).name: tree_digest(rejected_list_path(prepared_data.manifest))[""]}
    assert tree_digest(masks) == tree_digest(prepared_data.masks)

    in_place = validate.run(stage_config_for("validate", **VALIDATE), prepared_data.inbreast, prepared_data.manifest,
                            tmp_path / "report-in-place")
    assert in_place.success
    artifacts.move()
    report = artifacts.add("report")
    assert validate.run(stage_config_for("validate", **VALIDATE), artifacts["inbreast"],
                        artifacts["manifest"] / MANIFEST_FILE, report).success
    assert _summary(report) == _summary(tmp_path / "report-in-place")

    artifacts.move()
    dataset = artifacts.add("dataset")
    preprocess.run(stage_config_for("preprocess", size=128, workers=1), artifacts["inbreast"],
                   artifacts["manifest"] / MANIFEST_FILE, artifacts["masks"], dataset)
    assert tree_digest(dataset) == tree_digest(prepared_data.dataset)

    # Training and what follows are not bit-reproducible on every CPU: they must run, and name no root.
    artifacts.move()
    model, train_metrics = artifacts.add("model"), artifacts.add("train_metrics")
    train.run(stage_config_for("train", **dict(TINY_TRAIN, epochs=1, overlay_every=0)), artifacts["dataset"],
              model, train_metrics / "train.json", artifacts["report"])

    artifacts.move()
    metrics, evaluation = artifacts.add("metrics"), artifacts.add("evaluation")
    evaluate.run(stage_config_for("evaluate", bootstrap_resamples=200), artifacts["dataset"], artifacts["model"],
                 metrics / "evaluate.json", evaluation)

    artifacts.move()
    onnx = artifacts.add("onnx")
    export.run(stage_config_for("export", **FAST_EXPORT), artifacts["model"], artifacts["dataset"],
               onnx / "model.onnx")

    artifacts.move()
    decision = artifacts.add("decision")
    register.run(stage_config_for("register", name="relocated"), artifacts["onnx"] / "model.onnx",
                 artifacts["dataset"], decision / "registration.json")
    assert (decision / "registration.json").is_file()

    assert {name: _files_naming(folder, roots) for name, folder in artifacts.folders.items()
            if name != "inbreast" and _files_naming(folder, roots)} == {}
