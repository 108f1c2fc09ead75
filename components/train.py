"""train: LightUNet on the dataset, one MLflow run; resumes from the checkpoint in its model folder."""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import STAGE_COMMAND, TRAIN_IMAGE, lineage_args, stage_args

METRICS_FILE = "train_metrics.json"


@dsl.container_component
def train(params: str, dataset: Input[Dataset], validation_report: Input[Artifact], model: Output[Model],
          metrics: Output[Artifact], image_digest: str, checkpoint_dir: str, device: str, git_commit: str,
          git_dirty: str, data_dvc_hash: str):
    """Run `mammoseg train` on `device`, tagging the MLflow run with the KFP run id and the lineage.

    The image holds no git checkout and no data.dvc, so the lineage the run is tagged with (commit,
    dirty state, data hash, image digest) comes in as parameters.

    A retried attempt that finds checkpoint.pt of the same config resumes from it (and continues the
    same MLflow run) instead of starting over. On a cluster each attempt is a new pod, so the
    checkpoint must live on a persistent volume: `checkpoint_dir` (a mounted PVC; "" keeps it in the
    model folder, enough for kfp.local, which retries in place).

    Args:
        params: the `train:` block of params.yaml (one-line JSON).
        dataset: preprocess's dataset folder.
        validation_report: validate's report folder, attached to the run.
        model: folder with model.pt, checkpoint.pt, history.csv and mlflow_run.json.
        metrics: folder with train_metrics.json (best epoch, validation Dice, threshold).
        image_digest: the image's digest: the run's image_digest tag, and part of KFP's cache key.
        checkpoint_dir: where checkpoints persist across attempts; train adds the pipeline run id.
        device: the torch device, over the block's `device` (the pipeline gives cuda: a pod without a
            usable GPU then fails at once, in one line, instead of training on its CPU).
        git_commit: the commit the pipeline was compiled from ("unknown" outside a checkout).
        git_dirty: "True" or "False": whether tracked files differed from it then ("unknown").
        data_dvc_hash: the raw data's directory hash (the pipeline's data_hash).
    """
    return dsl.ContainerSpec(image=TRAIN_IMAGE, command=STAGE_COMMAND, args=stage_args(
        "train", params, "--dataset", dataset.path, "--model-out", model.path,
        "--metrics-out", f"{metrics.path}/{METRICS_FILE}", "--validation-report", validation_report.path,
        "--pipeline-run-id", dsl.PIPELINE_JOB_ID_PLACEHOLDER, "--checkpoint-dir", checkpoint_dir,
        "--device", device, *lineage_args(git_commit, git_dirty, data_dvc_hash, image_digest)))
