"""The raw dataset: fetches the DVC-versioned INbreast folder from its DVC remote by its hash.

Not a mammoseg stage: it is what `data.dvc` is for DVC. It runs DVC (installed in the image) in a
throw-away repository without git: a .dvc file naming the directory hash, `dvc pull` from the remote,
and the folder moved into the output artifact. The hash is the cache key that matters: the same hash
is the same bytes, so KFP may reuse the output; a new hash re-runs everything downstream. Remote
credentials (AWS_* for S3, AWS_ENDPOINT_URL_S3 for MinIO) come from the environment.
"""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.common import IMAGE

# $1 remote URL (s3://bucket/path, or any DVC remote), $2 directory hash (<md5>.dir), $3 output folder.
FETCH = r"""
set -eu
case "$2" in *.dir) ;; *) echo "data: '$2' is not a DVC directory hash (<md5>.dir, from data.dvc)" >&2; exit 2 ;; esac
work="$(dirname "$3")/.dvc-fetch"
trap 'rm -rf "$work"' EXIT
rm -rf "$work" "$3" && mkdir -p "$work" && cd "$work"
dvc init --no-scm --quiet
dvc config core.analytics false
dvc config cache.type hardlink,copy
dvc remote add --quiet --default origin "$1"
printf 'outs:\n- md5: %s\n  hash: md5\n  path: inbreast\n' "$2" > inbreast.dvc
dvc pull inbreast.dvc || { echo "data: cannot fetch $2 from $1 (see DVC's message above)" >&2; exit 1; }
mv inbreast "$3"
echo "data: $2 from $1 -> $3"
"""


@dsl.container_component
def data(data_uri: str, data_hash: str, inbreast: Output[Dataset], image_digest: str):
    """Fetch the raw dataset (INbreast layout) that `data_hash` names from the DVC remote `data_uri`.

    Args:
        data_uri: the DVC remote holding the data (e.g. s3://bucket/dvc-store).
        data_hash: the directory hash of data/inbreast, `outs[0].md5` of data.dvc (<md5>.dir).
        inbreast: the INbreast folder (AllDICOMs/, AllXML/, INbreast.csv).
        image_digest: the image's digest; unused by the command, part of KFP's cache key.
    """
    return dsl.ContainerSpec(image=IMAGE, command=["sh", "-c", FETCH, "data"],
                             args=[data_uri, data_hash, inbreast.path])
