"""validate: the data contract on the manifest and its DICOMs; exit 1 (a failed task) stops the pipeline."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.common import IMAGE, STAGE_COMMAND, stage_args
from components.ingest import MANIFEST_FILE


@dsl.container_component
def validate(params: str, inbreast: Input[Dataset], manifest: Input[Dataset], report: Output[Artifact],
             image_digest: str):
    """Run `mammoseg validate`.

    Args:
        params: the `validate:` block of params.yaml (one-line JSON).
        inbreast: the INbreast folder ingest read; the manifest names its DICOMs relative to it, and a
            pod on a cluster sees only the artifacts it declares.
        manifest: ingest's manifest folder.
        report: folder with the Great Expectations Data Docs and summary.json.
        image_digest: the image's digest; unused by the command, part of KFP's cache key.
    """
    return dsl.ContainerSpec(image=IMAGE, command=STAGE_COMMAND, args=stage_args(
        "validate", params, "--inbreast", inbreast.path, "--manifest", f"{manifest.path}/{MANIFEST_FILE}",
        "--report-out", report.path))
