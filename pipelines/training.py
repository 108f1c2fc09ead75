"""The training pipeline: data -> ingest -> validate -> preprocess -> train -> evaluate -> export -> register.

Reads params.yaml and data.dvc (through pipelines.settings) when the pipeline is built; writes the
KFP IR YAML. Every task runs the project image; nothing here imports torch or mammoseg.

Pipeline parameters:
    data_uri, data_hash: the DVC remote and the directory hash of the raw data. The hash is what
        KFP's cache sees: the same hash is the same bytes.
    image_digest, train_image_digest: the content digests (sha256:...) of the CPU image and of train's
        CUDA image, taken from the references when they are pinned (repo@sha256:...). KFP's cache
        ignores mutable image tags, so every stage task takes its image's digest as an input: a
        rebuilt image under the same tag re-runs the tasks.
    <stage>_params: the stage's params.yaml block as one-line JSON, one per stage, so a changed block
        re-runs its stage and what depends on it, and nothing upstream.
    git_commit, git_dirty: the checkout's HEAD and whether tracked files differed from it, when
        compiled. With data_hash and each task's image digest they are the lineage that train tags
        its MLflow run with and register its version's register_* tags with (the images hold no
        checkout and no data.dvc). As inputs of train they are part of its cache key: a pipeline
        compiled at another commit trains again, so a run's commit is always the code that trained.
    train_device: train's torch device (pipeline.train_device, cuda); `run --local` passes cpu.

With pipeline.trainjob_runtime set, train is a launcher task in the CPU image instead
(components/train_job.py, pipelines/trainjob.py) that runs `mammoseg train` as a Kubeflow Trainer
v2 TrainJob of train_nodes x train_gpus_per_node ranks on that runtime; the TrainJob's pods get the
GPUs, the MLflow secret, the checkpoint volume (through which the launcher hands them the inputs and
takes back the model) and the node selector and tolerations of train.

Cluster settings (from params.yaml's `pipeline:` block): MLflow and S3 credentials come from
Kubernetes secrets as environment variables (never parameters), each key only where the secret has it
but MLFLOW_TRACKING_URI (pipelines.settings.MLFLOW_ENV, S3_ENV); train runs the CUDA image on cuda,
asks for one GPU, CPUs, memory and a Memory-backed /dev/shm for its data-loader workers, has its own
node selector and tolerations (the GPU pool's taint), and is retried with exponential backoff (an
attempt that finds the previous attempt's checkpoint.pt resumes from it and continues the same MLflow
run; kfp.local retries in the same folder); every container runs as the image's uid/gid; with a
checkpoint PVC, a task checks at the start that the volume is writable and another removes the run's
checkpoint folder once train succeeded; register is never cached (it acts on the registry's current
state), nor are the checkpoint tasks (they act on the volume's).
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as objects.
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from components import data, evaluate, export, ingest, preprocess, register, train, validate
from components.checkpoints import check_checkpoint_volume, remove_run_checkpoints
from components.train_job import train_job
from pipelines.images import TaskImages, task_images
from pipelines.settings import MLFLOW_ENV, S3_ENV, CompileInputs, PipelineSettings, SecretKeys
from pipelines.trainjob import TrainJobSettings

# Where train sees the checkpoint volume (pipeline.checkpoint_pvc) when one is configured.
CHECKPOINT_MOUNT = "/checkpoints"

DESCRIPTION = ("Full-resolution mammography segmentation (LightUNet on INbreast): ingest, validate, preprocess, "
               "train, evaluate, export to ONNX, register in MLflow with a promotion gate.")


def _with_secret(task: dsl.PipelineTask, secret: str, keys: SecretKeys) -> dsl.PipelineTask:
    """Expose the secret's keys (named like the variables) as the task's environment variables.

    KFP's `optional` belongs to one mapping of a secret and goes onto each of its keys' secretKeyRef
    (KFP 2.15 and later; Kubernetes then skips a key, or the whole secret, that is absent), so the
    required and the optional keys are two mappings of the same secret.
    """
    for names, optional in ((keys.required, False), (keys.optional, True)):
        if names:
            kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={n: n for n in names},
                                         optional=optional)
    return task


def _place(task: dsl.PipelineTask, node_selector: dict[str, str], tolerations: list[dict[str, Any]]) -> None:
    """Give the task's pod the node selector and tolerations of the settings (checked by pipelines.settings)."""
    for label, value in node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in tolerations:
        kubernetes.add_toleration(task, **toleration)


def _run_as(task: dsl.PipelineTask, settings: PipelineSettings) -> None:
    """State the uid/gid the container runs as (and that it is not root), when the settings give them."""
    if settings.run_as_user is not None or settings.run_as_group is not None:
        non_root = None if settings.run_as_user is None else settings.run_as_user != 0
        kubernetes.set_security_context(task, run_as_user=settings.run_as_user, run_as_group=settings.run_as_group,
                                        run_as_non_root=non_root)


def _checkpoint_volume(trained: dsl.PipelineTask, checked: dsl.PipelineTask, removed: dsl.PipelineTask,
                       pvc: str) -> None:
    """Mount the checkpoint PVC on train, on the check that runs before it and the removal that follows it.

    The check has no input but the volume, so it runs at the start, beside the data download: a
    volume the image's user cannot write fails the run before it spends time on the data. The removal
    runs only once train succeeded (a failed train keeps its checkpoint for a retry of the run). Both
    act on the volume as it is now, so neither is ever served from KFP's cache.
    """
    trained.after(checked)
    removed.after(trained)
    for task in (checked, trained, removed):
        kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=CHECKPOINT_MOUNT)
    for task in (checked, removed):
        task.set_caching_options(enable_caching=False)


def trainjob_settings(settings: PipelineSettings, train_image: str) -> TrainJobSettings:
    """Return what the launcher builds the TrainJob from: the pipeline block's train settings, per node."""
    return TrainJobSettings(
        runtime=settings.trainjob_runtime, image=train_image, nodes=settings.train_nodes,
        gpus_per_node=settings.train_gpus_per_node, cpu_per_node=settings.train_cpu_request,
        memory_per_node=settings.train_memory_request, shm_size=settings.shm_size,
        volume_claim=settings.checkpoint_pvc, mount=CHECKPOINT_MOUNT, secret=settings.mlflow_secret,
        required_keys=MLFLOW_ENV.required, optional_keys=MLFLOW_ENV.optional,
        node_selector=settings.train_node_selector, tolerations=settings.train_tolerations,
        run_as_user=settings.run_as_user, run_as_group=settings.run_as_group, timeout=settings.trainjob_timeout)


def build_pipeline(inputs: CompileInputs, images: TaskImages | None = None) -> Any:
    """Define the pipeline with its parameters' defaults taken from the compile-time inputs.

    Args:
        inputs: params.yaml's blocks and data.dvc's hash, read by pipelines.settings.
        images: the image of every task but train, train's image, and their digests (the defaults of
            image_digest and train_image_digest); default components.common.IMAGE and TRAIN_IMAGE.

    Returns:
        The pipeline (a KFP graph component), ready for the compiler or a local run.
    """
    settings = inputs.pipeline
    defaults = inputs.stage_params
    images = images or task_images()

    def configure(task: dsl.PipelineTask, name: str, gpu: bool = False) -> dsl.PipelineTask:
        """Name the task; give it its image, requests, nodes and user (train: gpu=True, the CUDA image)."""
        task.set_display_name(name).set_cpu_request(settings.cpu_request).set_memory_request(settings.memory_request)
        if gpu:
            task.set_container_image(images.train_image)
            _place(task, settings.train_node_selector, settings.train_tolerations)
        else:
            task.set_container_image(images.image)
            _place(task, settings.node_selector, settings.tolerations)
        _run_as(task, settings)
        return task

    @dsl.pipeline(name=settings.name, description=DESCRIPTION)
    def mammoseg_training(
        data_uri: str = settings.data_remote,
        data_hash: str = inputs.data_hash,
        image_digest: str = images.image_digest,
        train_image_digest: str = images.train_image_digest,
        ingest_params: str = defaults["ingest"],
        validate_params: str = defaults["validate"],
        preprocess_params: str = defaults["preprocess"],
        train_params: str = defaults["train"],
        evaluate_params: str = defaults["evaluate"],
        export_params: str = defaults["export"],
        register_params: str = defaults["register"],
        checkpoint_dir: str = CHECKPOINT_MOUNT if settings.checkpoint_pvc else "",
        train_device: str = settings.train_device,
        git_commit: str = inputs.git_commit,
        git_dirty: str = inputs.git_dirty,
    ) -> dsl.Artifact:
        raw = configure(data(data_uri=data_uri, data_hash=data_hash, image_digest=image_digest), "data")
        _with_secret(raw, settings.s3_secret, S3_ENV)

        ingested = configure(ingest(params=ingest_params, inbreast=raw.outputs["inbreast"],
                                    image_digest=image_digest), "ingest")
        # validate and preprocess read the DICOMs from the raw data itself: the manifest names them
        # relative to that folder, and on a cluster a pod receives only the artifacts it declares.
        validated = configure(validate(params=validate_params, inbreast=raw.outputs["inbreast"],
                                       manifest=ingested.outputs["manifest"], image_digest=image_digest), "validate")
        # preprocess reads no output of validate, but runs on validated data only: a failed validate
        # (exit 1) fails the run here.
        prepared = configure(preprocess(params=preprocess_params, inbreast=raw.outputs["inbreast"],
                                        manifest=ingested.outputs["manifest"], masks=ingested.outputs["masks"],
                                        image_digest=image_digest), "preprocess")
        prepared.after(validated)

        if settings.trainjob_runtime:
            # A launcher in the CPU image: the TrainJob's pods have the GPUs, the secret and the volume.
            trained = configure(train_job(params=train_params, dataset=prepared.outputs["dataset"],
                                          validation_report=validated.outputs["report"],
                                          image_digest=train_image_digest, device=train_device,
                                          trainjob=trainjob_settings(settings, images.train_image).to_json(),
                                          git_commit=git_commit, git_dirty=git_dirty, data_dvc_hash=data_hash),
                                "train")
        else:
            trained = configure(train(params=train_params, dataset=prepared.outputs["dataset"],
                                      validation_report=validated.outputs["report"], image_digest=train_image_digest,
                                      checkpoint_dir=checkpoint_dir, device=train_device, git_commit=git_commit,
                                      git_dirty=git_dirty, data_dvc_hash=data_hash), "train", gpu=True)
            trained.set_cpu_request(settings.train_cpu_request).set_memory_request(settings.train_memory_request)
            trained.set_memory_limit(settings.train_memory_limit)
            trained.set_accelerator_type(settings.accelerator_type).set_accelerator_limit(settings.accelerator_limit)
            kubernetes.empty_dir_mount(trained, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=settings.shm_size)
        if settings.checkpoint_pvc:
            checked = configure(check_checkpoint_volume(checkpoint_dir=checkpoint_dir), "check-checkpoint-volume")
            removed = configure(remove_run_checkpoints(checkpoint_dir=checkpoint_dir), "remove-run-checkpoints")
            _checkpoint_volume(trained, checked, removed, settings.checkpoint_pvc)
        trained.set_retry(num_retries=settings.train_retries, backoff_duration=settings.retry_backoff,
                          backoff_factor=2.0, backoff_max_duration=settings.retry_backoff_max)

        evaluated = configure(evaluate(params=evaluate_params, dataset=prepared.outputs["dataset"],
                                       model=trained.outputs["model"], image_digest=image_digest), "evaluate")
        exported = configure(export(params=export_params, model=trained.outputs["model"],
                                    dataset=prepared.outputs["dataset"], image_digest=image_digest), "export")
        registered = configure(register(params=register_params, onnx=exported.outputs["onnx"],
                                        dataset=prepared.outputs["dataset"], image_digest=image_digest,
                                        git_commit=git_commit, git_dirty=git_dirty, data_dvc_hash=data_hash),
                             "register")
        # The promotion gate reads the test metric that evaluate logged to the training run.
        registered.after(evaluated)
        registered.set_caching_options(enable_caching=False)
        # The launcher of a TrainJob needs no MLflow credentials: its pods get them (pipelines.trainjob).
        for task in (evaluated, exported, registered) if settings.trainjob_runtime else (
                trained, evaluated, exported, registered):
            _with_secret(task, settings.mlflow_secret, MLFLOW_ENV)
        return registered.outputs["decision"]

    return mammoseg_training


def compile_pipeline(output: Path, inputs: CompileInputs, images: TaskImages | None = None) -> Path:
    """Compile the pipeline to KFP's IR YAML at `output` (parents created); return the path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(inputs, images), str(output))
    return output
