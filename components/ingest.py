"""ingest: the INbreast folder -> the manifest (with its rejected list) and full-resolution masks."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.common import IMAGE, STAGE_COMMAND, stage_args

# The manifest artifact is a folder: manifest.parquet and the manifest.rejected.csv written beside it.
MANIFEST_FILE = "manifest.parquet"


@dsl.container_component
def ingest(params: str, inbreast: Input[Dataset], manifest: Output[Dataset], masks: Output[Dataset],
           image_digest: str):
    """Run `mammoseg ingest`.

    Args:
        params: the `ingest:` block of params.yaml (one-line JSON).
        inbreast: the INbreast folder.
        manifest: folder with manifest.parquet (one row per image) and manifest.rejected.csv.
        masks: folder of <image_id>_mass.png / _calcification.png masks.
        image_digest: the image's digest; unused by the command, part of KFP's cache key.
    """
    return dsl.ContainerSpec(image=IMAGE, command=STAGE_COMMAND, args=stage_args(
        "ingest", params, "--inbreast", inbreast.path, "--manifest-out", f"{manifest.path}/{MANIFEST_FILE}",
        "--masks-out", masks.path))
