"""preprocess: the DICOMs + manifest + masks -> the training dataset at the network's resolution, with splits."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.common import IMAGE, STAGE_COMMAND, stage_args
from components.ingest import MANIFEST_FILE


@dsl.container_component
def preprocess(params: str, inbreast: Input[Dataset], manifest: Input[Dataset], masks: Input[Dataset],
               dataset: Output[Dataset], image_digest: str):
    """Run `mammoseg preprocess` (the pipeline runs it only after validate succeeded).

    Args:
        params: the `preprocess:` block of params.yaml (one-line JSON).
        inbreast: the INbreast folder ingest read; the manifest names its DICOMs relative to it.
        manifest: ingest's manifest folder.
        masks: ingest's masks folder.
        dataset: folder with the arrays, index.parquet and dataset.json.
        image_digest: the image's digest; unused by the command, part of KFP's cache key.
    """
    return dsl.ContainerSpec(image=IMAGE, command=STAGE_COMMAND, args=stage_args(
        "preprocess", params, "--inbreast", inbreast.path, "--manifest", f"{manifest.path}/{MANIFEST_FILE}",
        "--masks", masks.path, "--dataset-out", dataset.path))
