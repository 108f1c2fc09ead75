"""train as a Kubeflow Trainer v2 TrainJob: the launcher task's command, `python -m pipelines.trainjob`.

Used when params.yaml's pipeline.trainjob_runtime names a runtime (torch-distributed): the pipeline's
train task (components/train_job.py) then runs this in the CPU image instead of `mammoseg train`. It
reads the task's input artifacts (the dataset, the validation report) and the train params block,
creates a TrainJob of train_nodes x train_gpus_per_node ranks with the `kubeflow` SDK's TrainerClient
(`torchrun ... --no-python mammoseg train ...`, DistributedDataParallel), waits for it with its node-0
log in the task's log, and writes the task's model and metrics output artifacts.

The TrainJob's pods see no KFP artifact, only the checkpoint volume, so the run's folder on it
(<checkpoint_dir>/<pipeline run id>/, which remove-run-checkpoints deletes after train) carries
everything across:

    inputs/dataset/, inputs/validation_report/   copied there by the launcher
    train-params.json                            the train block, train's --params
    checkpoint.pt, model.pt                      train's resumable state (train.checkpoint_path)
    model/, train_metrics.json                   train's outputs, copied into the task's artifacts

The TrainJob is named after the pipeline run, so a retried launcher finds it: it waits for one still
running, and replaces a failed one, whose successor resumes from checkpoint.pt. The kubeflow SDK is
imported only when a TrainJob is built, so compiling the pipeline needs nothing but kfp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The Trainer runtimes' node container and replicated job (kubeflow.trainer.constants.NODE).
NODE = "node"
CHECKPOINT_VOLUME = "checkpoints"
SHM_VOLUME = "dshm"
INPUTS_DIR = "inputs"
PARAMS_FILE = "train-params.json"
MODEL_DIR = "model"
METRICS_FILE = "train_metrics.json"
# train's lineage flags, mammoseg.cli.LINEAGE_FLAGS' names (not imported: pipelines/ imports only kfp
# and, here, the kubeflow SDK); a test checks that they agree.
LINEAGE_FLAGS = ("--git-commit", "--git-dirty", "--data-dvc-hash", "--image-digest")
# Seconds between two looks at the TrainJob's status.
POLL_SECONDS = 10


class TrainJobError(RuntimeError):
    """The TrainJob could not be created, failed, or did not finish in time (one line)."""


@dataclasses.dataclass(frozen=True)
class TrainJobSettings:
    """What the TrainJob is made of, fixed when the pipeline is compiled (params.yaml's pipeline block).

    Attributes:
        runtime: the (Cluster)TrainingRuntime, e.g. torch-distributed.
        image: train's CUDA image.
        nodes: training nodes (pods), each running torchrun.
        gpus_per_node: GPUs per node, one rank each (torchrun --nproc-per-node).
        cpu_per_node: CPU request per node.
        memory_per_node: memory request per node.
        shm_size: the size of each node's Memory-backed /dev/shm (data-loader workers).
        volume_claim: the checkpoint PVC, mounted by the launcher and every node.
        mount: where it is mounted (the pipeline's checkpoint_dir).
        secret: the Kubernetes secret holding the MLflow variables.
        required_keys: its keys a node cannot start without.
        optional_keys: its keys mapped only where present.
        node_selector: node label -> value for the nodes.
        tolerations: Kubernetes tolerations (key, operator, value, effect, toleration_seconds) for the nodes.
        run_as_user: the nodes' uid (null: the image's).
        run_as_group: the nodes' gid, also the volume's fsGroup (null: none).
        timeout: seconds the launcher waits for the TrainJob to start, and again for it to finish.
    """

    runtime: str
    image: str
    nodes: int
    gpus_per_node: int
    cpu_per_node: str
    memory_per_node: str
    shm_size: str
    volume_claim: str
    mount: str
    secret: str
    required_keys: tuple[str, ...]
    optional_keys: tuple[str, ...]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    run_as_user: int | None
    run_as_group: int | None
    timeout: int

    def to_json(self) -> str:
        """Return the settings as one line of JSON (a constant argument of the launcher task)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJobSettings:
        """Read settings written by to_json."""
        values = json.loads(text)
        values["required_keys"] = tuple(values["required_keys"])
        values["optional_keys"] = tuple(values["optional_keys"])
        return cls(**values)


def job_name(run_id: str) -> str:
    """Return the TrainJob's name for a pipeline run: a DNS label, short enough for JobSet's pod names."""
    return "mammoseg-" + re.sub(r"[^a-z0-9]", "", run_id.lower())[:12]


def run_folder(settings: TrainJobSettings, run_id: str) -> Path:
    """Return the run's folder on the checkpoint volume (train.checkpoint_path's, for this run id)."""
    return Path(settings.mount) / run_id


def train_command(settings: TrainJobSettings, run_id: str, device: str,
                  lineage: Sequence[str] = ()) -> list[str]:
    """Return what every node runs: torchrun starting gpus_per_node ranks of `mammoseg train`.

    The runtime's torch policy gives torchrun the node count, this node's rank and the master's
    address (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT); the node and process
    counts are stated here too, so the command says what it runs. `lineage` are train's lineage
    flags (--git-commit ... --image-digest ...), passed on as the launcher received them: the
    image holds no checkout to read them from.
    """
    folder = run_folder(settings, run_id)
    return ["torchrun", "--nnodes", str(settings.nodes), "--nproc-per-node", str(settings.gpus_per_node),
            "--no-python", "mammoseg", "--params", str(folder / PARAMS_FILE), "train",
            "--dataset", str(folder / INPUTS_DIR / "dataset"),
            "--validation-report", str(folder / INPUTS_DIR / "validation_report"),
            "--model-out", str(folder / MODEL_DIR), "--metrics-out", str(folder / METRICS_FILE),
            "--pipeline-run-id", run_id, "--checkpoint-dir", settings.mount, "--device", device, *lineage]


def _secret_env(settings: TrainJobSettings) -> list[dict[str, Any]]:
    keys = [(key, False) for key in settings.required_keys] + [(key, True) for key in settings.optional_keys]
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": settings.secret, "key": key, "optional": optional}}}
            for key, optional in keys]


def _pod_patch(settings: TrainJobSettings) -> Any:
    """Return the nodes' pod patch: the volumes, the secret's variables, placement and user."""
    from kubeflow.trainer import options

    security = {k: v for k, v in {"runAsUser": settings.run_as_user, "runAsGroup": settings.run_as_group,
                                  "runAsNonRoot": None if settings.run_as_user is None else settings.run_as_user != 0,
                                  # A pod may set fsGroup (a KFP task may not): the volume becomes writable for it.
                                  "fsGroup": settings.run_as_group}.items() if v is not None}
    tolerations = [{("tolerationSeconds" if k == "toleration_seconds" else k): v for k, v in toleration.items()}
                   for toleration in settings.tolerations]
    container = options.ContainerPatch(
        name=NODE, env=_secret_env(settings) or None,
        volume_mounts=[{"name": CHECKPOINT_VOLUME, "mountPath": settings.mount},
                       {"name": SHM_VOLUME, "mountPath": "/dev/shm"}])
    spec = options.PodSpecPatch(
        volumes=[{"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": settings.volume_claim}},
                 {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}],
        containers=[container], security_context=security or None,
        node_selector=settings.node_selector or None, tolerations=tolerations or None)
    return options.RuntimePatch(training_runtime_spec=options.TrainingRuntimeSpecPatch(
        template=options.JobSetTemplatePatch(spec=options.JobSetSpecPatch(replicated_jobs=[
            options.ReplicatedJobPatch(name=NODE, template=options.JobTemplatePatch(spec=options.JobSpecPatch(
                template=options.PodTemplatePatch(spec=spec))))]))))


def submit(client: Any, settings: TrainJobSettings, run_id: str, device: str, lineage: Sequence[str] = ()) -> str:
    """Create the run's TrainJob through a TrainerClient; return its name.

    Args:
        client: a kubeflow.trainer.TrainerClient (its Kubernetes backend).
        settings: the compile-time settings.
        run_id: the pipeline run's id (names the job and its folder).
        device: train's torch device (cuda).
        lineage: train's lineage flags (train_command).
    """
    from kubeflow.trainer import CustomTrainerContainer, options

    trainer = CustomTrainerContainer(
        image=settings.image, num_nodes=settings.nodes,
        # Quantities as strings: the SDK would write a number as a float (4.0).
        resources_per_node={"nvidia.com/gpu": str(settings.gpus_per_node), "cpu": settings.cpu_per_node,
                            "memory": settings.memory_per_node})
    return client.train(runtime=settings.runtime, trainer=trainer, options=[
        options.Name(job_name(run_id)), options.TrainerCommand(train_command(settings, run_id, device, lineage)),
        _pod_patch(settings)])


def stage_inputs(settings: TrainJobSettings, run_id: str, params: str, dataset: Path,
                 validation_report: Path) -> Path:
    """Copy the task's inputs and the train block into the run's folder on the volume; return the folder."""
    folder = run_folder(settings, run_id)
    for source, name in ((dataset, "dataset"), (validation_report, "validation_report")):
        target = folder / INPUTS_DIR / name
        if target.exists():
            shutil.rmtree(target)  # a retry copies afresh: the artifact is the truth
        shutil.copytree(source, target)
    (folder / PARAMS_FILE).write_text(params + "\n")
    return folder


def collect_outputs(folder: Path, model_out: Path, metrics_out: Path) -> None:
    """Copy train's outputs from the run's folder into the task's output artifacts."""
    shutil.copytree(folder / MODEL_DIR, model_out, dirs_exist_ok=True)
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / METRICS_FILE, metrics_out)


def _existing_status(client: Any, name: str) -> str | None:
    """Return the status of the TrainJob called `name`, or None when there is none."""
    from kubernetes.client.exceptions import ApiException

    try:
        return client.get_job(name).status
    except RuntimeError as exc:
        if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
            return None
        raise


def _wait_gone(client: Any, name: str, timeout: int) -> None:
    """Wait until a deleted TrainJob is gone (deletion is asynchronous; its name is taken until then)."""
    deadline = time.monotonic() + timeout
    while _existing_status(client, name) is not None:
        if time.monotonic() > deadline:
            raise TrainJobError(f"TrainJob {name}: still there {timeout} s after it was deleted")
        time.sleep(POLL_SECONDS)


def run_trainjob(client: Any, settings: TrainJobSettings, run_id: str, device: str,
                 lineage: Sequence[str] = ()) -> None:
    """Create (or find, on a retry) the run's TrainJob, follow node 0's log, wait until it completes.

    `lineage` are train's lineage flags (train_command).

    Raises:
        TrainJobError: the job failed or did not start or finish within settings.timeout.
    """
    name = job_name(run_id)
    status = _existing_status(client, name)
    if status == "Failed":
        log.info("TrainJob %s of an earlier attempt failed: replacing it (train resumes from its checkpoint)", name)
        client.delete_job(name)
        _wait_gone(client, name, settings.timeout)
        status = None
    if status is None:
        submit(client, settings, run_id, device, lineage)
        log.info("TrainJob %s created: %d node(s) x %d GPU(s), runtime %s", name, settings.nodes,
                 settings.gpus_per_node, settings.runtime)
    else:
        log.info("TrainJob %s of an earlier attempt is %s: waiting for it", name, status)
    try:
        client.wait_for_job_status(name, status={"Running", "Complete", "Failed"}, timeout=settings.timeout,
                                   polling_interval=POLL_SECONDS)
        for line in client.get_job_logs(name, follow=True):
            log.info("%s: %s", NODE, line.rstrip())
        client.wait_for_job_status(name, status={"Complete"}, timeout=settings.timeout, polling_interval=POLL_SECONDS)
    except (RuntimeError, TimeoutError) as exc:
        raise TrainJobError(f"TrainJob {name}: {exc}") from None
    client.delete_job(name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.trainjob", description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="the train block of params.yaml (JSON)")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--validation-report", type=Path, required=True)
    parser.add_argument("--model-out", type=Path, required=True)
    parser.add_argument("--metrics-out", type=Path, required=True)
    parser.add_argument("--pipeline-run-id", required=True)
    parser.add_argument("--device", required=True, help="train's torch device on the nodes (cuda)")
    parser.add_argument("--trainjob", required=True, help="TrainJobSettings as JSON (fixed at compile time)")
    # train's lineage flags (mammoseg.cli.LINEAGE_FLAGS), passed on to it unread.
    for flag in LINEAGE_FLAGS:
        parser.add_argument(flag, default=None)
    return parser


def _lineage(args: argparse.Namespace) -> list[str]:
    """Return the lineage flags the launcher was given, as train's arguments."""
    return [part for flag in LINEAGE_FLAGS
            if (value := getattr(args, flag[2:].replace("-", "_"))) is not None for part in (flag, value)]


def main(argv: Sequence[str] | None = None) -> int:
    """Stage the inputs, run the TrainJob, collect its outputs; return the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    settings = TrainJobSettings.from_json(args.trainjob)
    from kubeflow.trainer import TrainerClient

    try:
        folder = stage_inputs(settings, args.pipeline_run_id, args.params, args.dataset, args.validation_report)
        run_trainjob(TrainerClient(), settings, args.pipeline_run_id, args.device, _lineage(args))
        collect_outputs(folder, args.model_out, args.metrics_out)
    except (TrainJobError, OSError) as exc:
        sys.stderr.write(f"trainjob: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
