"""Runs a compiled pipeline (IR YAML) on this machine with kfp.local's DockerRunner.

Reads the IR YAML and the engine's copy of the image; writes every task's outputs under the pipeline
root. kfp.local's DockerRunner (kfp 2.17) passes `network_mode`, `environment`, `shm_size` and `user`
through to `docker run` and merges `environment` into each task's own, so those need no shim. One
shim remains, `_container_component_outputs` (see there): kfp.local loses the output artifacts of
container components, which all of ours are.

- Network: the containers use the host network, so `127.0.0.1` in MLFLOW_TRACKING_URI or
  AWS_ENDPOINT_URL_S3 is the host's (a bridged container would see only itself).
- Environment: what Kubernetes secrets provide on a cluster (pipelines.settings.MLFLOW_ENV, S3_ENV) is
  forwarded from the caller's environment, by name; nothing secret becomes a pipeline parameter.
- User: the image's non-root user, as on a cluster. kfp.local bind-mounts the pipeline root at the
  same path, so that user must be able to write there: as root on the host the pipeline root is handed
  to it; a non-root host user instead runs the containers under its own uid (outputs stay its own).
- /dev/shm: Docker's 64 MB default would starve the data loader's workers; the cluster's size is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from kfp import components, local
from kfp.local import executor_output_utils
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.settings import MLFLOW_ENV, S3_ENV

log = logging.getLogger(__name__)


class LocalRunError(RuntimeError):
    """The engine or the image is missing, or a task failed (the message says which)."""


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """A finished local run: its pipeline root and register's decision file."""

    pipeline_root: Path
    decision: Path


def docker_client():
    """Return a docker-py client for the local engine; LocalRunError when none answers."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise LocalRunError(f"no Docker engine answers ({exc}); start one: scripts/docker_engine.sh start") from None
    return client


def image_digest(image: str) -> str:
    """Return the engine's content id (sha256:...) of a local image; LocalRunError when it is absent."""
    import docker

    client = docker_client()
    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        raise LocalRunError(f"image {image!r} is not in the local engine; build it: scripts/build_image.sh") from None
    finally:
        client.close()


def forwarded_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the variables the cluster's secrets would set, taken from `environ` where present."""
    return {name: environ[name] for name in (*MLFLOW_ENV.names, *S3_ENV.names) if environ.get(name)}


def docker_size(quantity: str) -> str:
    """Convert a Kubernetes quantity (8Gi, 512Mi) to Docker's size syntax (8g, 512m)."""
    match = re.fullmatch(r"(\d+)([KMGT])i?", quantity.strip())
    if not match:
        raise LocalRunError(f"shm size {quantity!r} is not N[K|M|G|T]i")
    return f"{match.group(1)}{match.group(2).lower()}"


@contextlib.contextmanager
def _container_component_outputs() -> Iterator[None]:
    """Shim: record a container component's output artifacts the way KFP's launcher does.

    kfp.local learns a finished task's outputs only from the executor-output file that KFP's Python
    executor writes; a container component writes none, so its output artifacts are dropped and the
    next task fails ("Tried to get output 'inbreast' from task 'data', but task 'data' not found").
    On a cluster the launcher records every output artifact of the executor input once the command
    succeeds. While this context is active, kfp.local does the same for a task without that file.
    """
    original = executor_output_utils.get_outputs_for_task

    def get_outputs_for_task(executor_input, component_spec):
        if os.path.isfile(executor_input.outputs.output_file):
            return original(executor_input, component_spec)
        executor_output = pipeline_spec_pb2.ExecutorOutput()
        for name, artifacts in executor_input.outputs.artifacts.items():
            executor_output.artifacts[name].CopyFrom(artifacts)
        return executor_output_utils.get_outputs_from_executor_output(executor_output, executor_input, component_spec)

    executor_output_utils.get_outputs_for_task = get_outputs_for_task
    try:
        yield
    finally:
        executor_output_utils.get_outputs_for_task = original


def _container_user(image: str, pipeline_root: Path) -> tuple[str | None, dict[str, str]]:
    """Return (docker `user`, extra environment) that lets the task containers write the pipeline root."""
    if os.getuid() != 0:
        return f"{os.getuid()}:{os.getgid()}", {"HOME": "/tmp"}
    client = docker_client()
    try:
        user = client.images.get(image).attrs["Config"].get("User") or "0"
    finally:
        client.close()
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise LocalRunError(f"image {image!r} runs as {user!r}; expected a numeric uid[:gid]")
    os.chown(pipeline_root, int(uid), int(gid or uid))
    return None, {}


def run_local(package: Path, pipeline_root: Path, image: str, arguments: Mapping[str, str],
              environ: Mapping[str, str], shm_size: str, cache: bool = False) -> LocalRun:
    """Run a compiled pipeline with kfp.local.DockerRunner, the containers on the host network.

    Args:
        package: the compiled IR YAML.
        pipeline_root: where the tasks' outputs go (created; bind-mounted into every container).
        image: the image the package's tasks run in (for its user; it must be in the local engine).
        arguments: pipeline parameter values that replace the package's defaults.
        environ: the environment to forward MLflow and S3 variables from (os.environ usually).
        shm_size: /dev/shm of each container, as a Kubernetes quantity (params.yaml pipeline.shm_size).
        cache: reuse outputs of tasks run before with the same inputs (kfp.local's cache).

    Returns:
        The pipeline root and register's registration.json.

    Raises:
        LocalRunError: no engine, no image, or a task failed (validate's failure included).
    """
    pipeline_root = pipeline_root.resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    image_digest(image)  # fails early and clearly when the engine or the image is missing
    user, extra_env = _container_user(image, pipeline_root)
    run_args = {"network_mode": "host", "environment": {**forwarded_environment(environ), **extra_env},
                "shm_size": docker_size(shm_size)}
    if user is not None:
        run_args["user"] = user
    workspace = pipeline_root / ".workspace"
    workspace.mkdir(exist_ok=True)
    local.init(runner=local.DockerRunner(**run_args), pipeline_root=str(pipeline_root),
               workspace_root=str(workspace), raise_on_error=True, enable_caching=cache)
    pipeline = components.load_component_from_file(str(package))
    # No volumes locally: checkpoints stay in the model artifact, where kfp.local's retries find them.
    # No GPU either (DockerRunner requests no devices), so train runs on the CPU, said as such.
    arguments = {**arguments, "checkpoint_dir": "", "train_device": "cpu"}
    log.info("cluster-only settings (resource requests, the GPU, nodes, /dev/shm volume, checkpoint volume, secrets, "
             "security context) do not apply locally; retries and caching do")
    try:
        with _container_component_outputs(), warnings.catch_warnings():
            # kfp.local warns once per task about those settings; said once above.
            warnings.filterwarnings("ignore", message=r"Task .* have no effect in the current local runner")
            task = pipeline(**arguments)
    except RuntimeError as exc:
        raise LocalRunError(f"local run of {package} failed: {exc}") from None
    decision = Path(task.output.path)
    return LocalRun(pipeline_root, decision / "registration.json")
