"""train_job: train as a Kubeflow Trainer v2 TrainJob, launched and awaited from the CPU image.

The pipeline's train task when pipeline.trainjob_runtime is set. Same inputs and outputs as the
train component, so evaluate and export read its model alike; the command is the launcher
(`python -m pipelines.trainjob`, from the `pipeline` extra's kubeflow SDK), which copies the inputs
onto the checkpoint volume, creates the TrainJob with TrainerClient and copies train's outputs back.
"""

# No `from __future__ import annotations`: KFP reads the Input/Output annotations as objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import IMAGE, lineage_args
from components.train import METRICS_FILE

LAUNCHER_COMMAND = ["python", "-m", "pipelines.trainjob"]


@dsl.container_component
def train_job(params: str, dataset: Input[Dataset], validation_report: Input[Artifact], model: Output[Model],
              metrics: Output[Artifact], image_digest: str, device: str, trainjob: str, git_commit: str,
              git_dirty: str, data_dvc_hash: str):
    """Run `mammoseg train` as a TrainJob of nodes x GPUs ranks and wait for it.

    Args:
        params: the `train:` block of params.yaml (one-line JSON), train's --params on the nodes.
        dataset: preprocess's dataset folder (copied onto the checkpoint volume for the nodes).
        validation_report: validate's report folder, attached to the run.
        model: folder with model.pt, checkpoint.pt, history.csv and mlflow_run.json.
        metrics: folder with train_metrics.json (best epoch, validation Dice, threshold).
        image_digest: train's image digest: the run's image_digest tag, and part of KFP's cache key.
        device: the torch device on the nodes (cuda).
        trainjob: pipelines.trainjob.TrainJobSettings as JSON: runtime, image, nodes, GPUs, volume.
        git_commit: the commit the pipeline was compiled from ("unknown" outside a checkout).
        git_dirty: "True" or "False": whether tracked files differed from it then ("unknown").
        data_dvc_hash: the raw data's directory hash (the pipeline's data_hash).
    """
    return dsl.ContainerSpec(image=IMAGE, command=LAUNCHER_COMMAND, args=[
        "--params", params, "--dataset", dataset.path, "--validation-report", validation_report.path,
        "--model-out", model.path, "--metrics-out", f"{metrics.path}/{METRICS_FILE}",
        "--pipeline-run-id", dsl.PIPELINE_JOB_ID_PLACEHOLDER, "--device", device, "--trainjob", trainjob,
        *lineage_args(git_commit, git_dirty, data_dvc_hash, image_digest)])
