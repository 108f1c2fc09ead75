"""train as a Kubeflow Trainer v2 TrainJob: what the launcher submits, and how the pipeline wires it.

No cluster here: the kubeflow SDK's real TrainerClient (Kubernetes backend) talks to a stand-in
Kubernetes API on 127.0.0.1 that serves the torch-distributed ClusterTrainingRuntime (as Trainer
installs it) and records the TrainJob the client POSTs, so the test reads the very object a cluster
would receive. The SDK's local-process backend is not used: it runs only CustomTrainer (a Python
function in a fresh venv), not the CustomTrainerContainer (an image and a command) submitted here.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from mammoseg.cli import LINEAGE_FLAGS, build_parser
from mammoseg.config import load_params
from pipelines.cli import main
from pipelines.settings import SettingsError, load_compile_inputs
from pipelines.training import CHECKPOINT_MOUNT, trainjob_settings
from pipelines.trainjob import LINEAGE_FLAGS as PASSED_ON
from pipelines.trainjob import TrainJobSettings, _lineage, _parser, job_name, submit
from tests.conftest import REPO_ROOT

NAMESPACE = "kubeflow-user-example-com"
RUN_ID = "0b6ea5d8-3f3c-4c8e-9d5e-7c3f0a1b2c3d"
LINEAGE = ["--git-commit", "ab" * 20, "--git-dirty", "False", "--data-dvc-hash", "0123abcd.dir",
           "--image-digest", "sha256:" + "cd" * 32]
TRAIN_IMAGE = "registry.example.org/mammoseg@sha256:" + "cd" * 32
TRAINJOB = {"pipeline.trainjob_runtime": "torch-distributed", "pipeline.train_nodes": 2,
            "pipeline.train_gpus_per_node": 4}
# The torch-distributed runtime as Trainer's manifests install it (the parts the SDK reads).
TORCH_DISTRIBUTED = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
             "template": {"spec": {"replicatedJobs": [{
                 "name": "node",
                 "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                              "spec": {"template": {"spec": {"containers": [{
                                  "name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime",
                                  "command": ["/bin/bash", "-c", "echo 'Torch Distributed Runtime'"]}]}}}}}]}}}}


class _KubernetesApi(BaseHTTPRequestHandler):
    """The few Kubernetes API calls TrainerClient.train makes; TrainJobs POSTed are kept in `created`."""

    created: list[dict] = []

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.endswith("/clustertrainingruntimes/torch-distributed"):
            return self._reply(200, TORCH_DISTRIBUTED)
        # No namespaced runtime of that name, no Trainer version ConfigMap: the SDK falls back / warns.
        return self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                 "reason": "NotFound", "message": f"{self.path} not found"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if re.fullmatch(rf"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs", self.path):
            type(self).created.append(body)
            return self._reply(201, body)
        return self._reply(404, {"kind": "Status", "code": 404, "message": self.path})

    def log_message(self, *args):
        pass


@pytest.fixture
def kubernetes_api():
    """A stand-in Kubernetes API server on 127.0.0.1; yields (client configuration, created TrainJobs)."""
    from kubernetes.client import Configuration

    _KubernetesApi.created = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KubernetesApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield configuration, _KubernetesApi.created
    server.shutdown()


def test_the_trainjob_runs_torchrun_mammoseg_train_on_nodes_x_gpus_with_the_volume(kubernetes_api):
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

    configuration, created = kubernetes_api
    inputs = load_compile_inputs(overrides=TRAINJOB)
    settings = trainjob_settings(inputs.pipeline, TRAIN_IMAGE)
    client = TrainerClient(KubernetesBackendConfig(namespace=NAMESPACE, client_configuration=configuration))
    assert submit(client, settings, RUN_ID, "cuda", LINEAGE) == job_name(RUN_ID)

    (job,) = created
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == (
        "trainer.kubeflow.org/v1alpha1", "TrainJob", job_name(RUN_ID))
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 21
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    assert trainer["image"] == TRAIN_IMAGE and trainer["numNodes"] == 2
    gpus = {"nvidia.com/gpu": "4", "cpu": inputs.pipeline.train_cpu_request,
            "memory": inputs.pipeline.train_memory_request}
    assert trainer["resourcesPerNode"] == {"limits": gpus, "requests": gpus}
    command = trainer["command"]
    assert command[:7] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--no-python", "mammoseg"]
    # The rest is a `mammoseg train` command line: mammoseg's own parser reads it.
    args = build_parser(load_params(REPO_ROOT / "params.yaml")).parse_args(command[7:])
    folder = Path(CHECKPOINT_MOUNT) / RUN_ID
    assert args.command == "train" and args.device == "cuda"
    assert (args.dataset, args.validation_report) == (folder / "inputs/dataset", folder / "inputs/validation_report")
    assert (args.model_out, args.metrics_out) == (folder / "model", folder / "train_metrics.json")
    assert (args.params, args.checkpoint_dir, args.pipeline_run_id) == (folder / "train-params.json",
                                                                        CHECKPOINT_MOUNT, RUN_ID)
    # The lineage the launcher was given reaches train: the image has no checkout to read it from.
    assert (args.git_commit, args.git_dirty, args.data_dvc_hash, args.image_digest) == tuple(LINEAGE[1::2])

    (patch,) = spec["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": inputs.pipeline.checkpoint_pvc}} \
        in pod["volumes"]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT} in container["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == {"name": inputs.pipeline.mlflow_secret, "key": "MLFLOW_TRACKING_URI",
                                          "optional": False}
    assert env["MLFLOW_TRACKING_PASSWORD"]["optional"] is True
    # A pod (unlike a KFP task) may set fsGroup: the volume is the image's group's to write.
    assert pod["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True, "fsGroup": 1000}
    assert pod["tolerations"] == inputs.pipeline.train_tolerations


def test_the_pipeline_runs_train_through_the_launcher_with_the_volume(tmp_path):
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--output", str(out), "--train-image", TRAIN_IMAGE,
                 *[f"--set={key}={value}" for key, value in TRAINJOB.items()]]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train-job"]["taskInfo"]["name"] == "train"  # the train_job component, shown as train
    executor = spec["components"][tasks["train-job"]["componentRef"]["name"]]["executorLabel"]
    container = spec["deploymentSpec"]["executors"][executor]["container"]
    assert container["command"] == ["python", "-m", "pipelines.trainjob"]
    assert container["image"] == "mammoseg:cpu"  # the launcher waits; the TrainJob's pods have the GPUs
    assert "accelerator" not in container.get("resources", {})
    args = container["args"]
    assert args[args.index("--trainjob") + 1] == "{{$.inputs.parameters['trainjob']}}"
    # The settings are a constant of the task, fixed when compiling.
    settings = TrainJobSettings.from_json(
        tasks["train-job"]["inputs"]["parameters"]["trainjob"]["runtimeValue"]["constant"])
    assert (settings.runtime, settings.nodes, settings.gpus_per_node, settings.image) == (
        "torch-distributed", 2, 4, TRAIN_IMAGE)
    # The launcher's command line parses (placeholders stand for what KFP fills in).
    parsed = _parser().parse_args(args)
    assert parsed.dataset.as_posix().startswith("{{$.inputs.artifacts['dataset']")
    # It passes on train's lineage flags, all of them, with the pipeline's parameters.
    assert tuple(flag for flag, _ in LINEAGE_FLAGS) == PASSED_ON
    lineage = dict(zip(_lineage(parsed)[::2], _lineage(parsed)[1::2], strict=True))
    assert lineage["--git-commit"] == "{{$.inputs.parameters['git_commit']}}"
    assert lineage["--image-digest"] == "{{$.inputs.parameters['image_digest']}}"
    (mount,) = executors[executor]["pvcMount"]
    assert mount["mountPath"] == CHECKPOINT_MOUNT == settings.mount  # it stages the inputs on the volume
    assert "secretAsEnv" not in executors[executor]  # the TrainJob's pods get the MLflow secret
    assert "train-job" in tasks["remove-run-checkpoints"]["dependentTasks"]
    assert {"evaluate", "export"} <= {name for name, task in tasks.items()
                                      if "train-job" in task.get("dependentTasks", [])}


def test_a_trainjob_needs_the_checkpoint_volume_and_a_size():
    with pytest.raises(SettingsError, match="set pipeline.checkpoint_pvc"):
        load_compile_inputs(overrides={**TRAINJOB, "pipeline.checkpoint_pvc": ""})
    with pytest.raises(SettingsError, match="pipeline.train_gpus_per_node: expected a whole number >= 1"):
        load_compile_inputs(overrides={**TRAINJOB, "pipeline.train_gpus_per_node": 0})
