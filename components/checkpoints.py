"""The checkpoint volume around train: checked writable when a run starts, the run's folder removed after train.

Not mammoseg stages. On a cluster train keeps its resumable checkpoint on a PVC, in
<checkpoint_dir>/<pipeline run id>/ (mammoseg.stages.train.checkpoint_path), so that a retry in a new
pod resumes. Once train has succeeded nothing reads that folder again (the model artifact holds the
model), so it is removed, run by run; a failed train keeps it for the run's retry.

kfp-kubernetes gives a task no pod-level securityContext, hence no fsGroup that would make the
volume writable for the image's uid/gid. A volume they cannot write would fail train only at its
first checkpoint, after preprocess and a whole epoch on a GPU; the check runs at the start of the run
instead (beside the data download) and says what is wrong in one line.
"""

# No `from __future__ import annotations`: KFP reads the annotations as objects.
from kfp import dsl

from components.common import IMAGE

# $1 the checkpoint folder (the PVC's mount; "" = no volume, nothing to do), $2 the pipeline run id.
CHECK_WRITABLE = r"""
set -eu
[ -n "$1" ] || { echo "checkpoints: no checkpoint volume; train keeps its checkpoint in the model artifact"; exit 0; }
probe="$1/.write-check-$2"
if ! ( : > "$probe" ) 2>/dev/null; then
    echo "checkpoints: $1 is not writable by uid $(id -u) gid $(id -g); make the checkpoint PVC" \
         "writable for that group (README: The checkpoint volume)" >&2
    exit 2
fi
rm -f "$probe"
echo "checkpoints: $1 is writable by uid $(id -u) gid $(id -g)"
"""

# $1 the checkpoint folder, $2 the pipeline run id: removes $1/$2 and nothing else.
REMOVE_RUN_FOLDER = r"""
set -eu
[ -n "$1" ] || { echo "checkpoints: no checkpoint volume; nothing to remove"; exit 0; }
case "$2" in ""|.|..|*/*) echo "checkpoints: '$2' is not a pipeline run id" >&2; exit 2 ;; esac
rm -rf -- "$1/$2"
echo "checkpoints: removed $1/$2"
"""


def _on_the_volume(script: str, checkpoint_dir: str) -> dsl.ContainerSpec:
    """Return the container of a checkpoint task: `sh -c SCRIPT checkpoints <checkpoint_dir> <run id>`."""
    return dsl.ContainerSpec(image=IMAGE, command=["sh", "-c", script, "checkpoints"],
                             args=[checkpoint_dir, dsl.PIPELINE_JOB_ID_PLACEHOLDER])


@dsl.container_component
def check_checkpoint_volume(checkpoint_dir: str):
    """Fail (exit 2, one line) unless the image's user can create a file in `checkpoint_dir`.

    Args:
        checkpoint_dir: where the checkpoint PVC is mounted ("" = no volume: succeeds at once).
    """
    return _on_the_volume(CHECK_WRITABLE, checkpoint_dir)


@dsl.container_component
def remove_run_checkpoints(checkpoint_dir: str):
    """Remove this pipeline run's checkpoint folder, `checkpoint_dir`/<run id>, and nothing else.

    Args:
        checkpoint_dir: where the checkpoint PVC is mounted ("" = no volume: nothing to remove).
    """
    return _on_the_volume(REMOVE_RUN_FOLDER, checkpoint_dir)
