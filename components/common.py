"""What every component shares: the image reference (named once) and the way a stage is invoked.

A stage runs as `mammoseg --params <file> <stage> <flags>` in the project image. The params file holds
only that stage's params.yaml block, which the component gets as one line of JSON (valid YAML; a
pipeline parameter per stage, defaulted from params.yaml at compile time) and writes to a file in a
one-line POSIX shell prologue, because the CLI reads list- and mapping-valued settings from a file
only. Giving each stage its own block keeps KFP's cache as precise as DVC's `params:` (a new `train:`
block re-runs train and what follows, never ingest).
"""

from __future__ import annotations

# The images the components run in, as scripts/build_image.sh tags them (beside a content-hash tag):
# the CPU image for every task but train, the CUDA image (`--variant cuda`) for train, the one task
# that asks for a GPU. `mammoseg-pipeline compile --image REF --train-image REF` replaces them, on a
# cluster with registry references pinned by digest (repo@sha256:...).
IMAGE = "mammoseg:cpu"
TRAIN_IMAGE = "mammoseg:cuda"

# Writes the stage's params block ($1) to a file, then becomes `mammoseg --params FILE <the rest>`,
# keeping mammoseg's exit status (validate's 1 stops the pipeline).
RUN_STAGE = 'params="$(mktemp)" && printf "%s\\n" "$1" > "$params" && shift && exec mammoseg --params "$params" "$@"'

# `sh -c SCRIPT NAME ARG...`: NAME becomes $0 (shown in error messages), the ARGs $1...
STAGE_COMMAND = ["sh", "-c", RUN_STAGE, "mammoseg-stage"]


def stage_args(stage: str, params: str, *flags: str) -> list[str]:
    """Return a stage component's args: its params block, then the stage and its flags.

    Args:
        stage: the mammoseg subcommand.
        params: the stage's params.yaml block as one-line JSON (an input parameter placeholder).
        flags: the stage's path flags and their values (artifact path placeholders).
    """
    return [params, stage, *flags]


def lineage_args(git_commit: str, git_dirty: str, data_dvc_hash: str, image_digest: str) -> list[str]:
    """Return the lineage flags of `mammoseg train|register` (mammoseg.cli.LINEAGE_FLAGS).

    The image holds no git checkout and no data.dvc, where the stage would read them otherwise.

    Args:
        git_commit: the commit (an input parameter placeholder).
        git_dirty: "True" or "False" (likewise).
        data_dvc_hash: the raw data's DVC directory hash (likewise).
        image_digest: the digest of the image the task runs in (likewise).
    """
    return ["--git-commit", git_commit, "--git-dirty", git_dirty, "--data-dvc-hash", data_dvc_hash,
            "--image-digest", image_digest]
