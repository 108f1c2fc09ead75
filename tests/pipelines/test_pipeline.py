"""The compiled pipeline: stages, dependencies, the GPU request, retries, secrets, caching parameters.

Reads the IR YAML that `mammoseg-pipeline compile` writes (what a KFP cluster receives).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mammoseg.cli import PIPELINE_STAGES, STAGES
from pipelines.cli import main
from tests.conftest import REPO_ROOT

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
SETTINGS = PARAMS["pipeline"]


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) compiled through the CLI with one override."""
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    assert main(["compile", "--output", str(out), "--set", "train.epochs=3",
                 "--image-digest", "sha256:" + "ab" * 32]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict:
    return spec["root"]["dag"]["tasks"]


CHECKPOINT_TASKS = {"check-checkpoint-volume", "remove-run-checkpoints"}


def test_every_stage_runs_in_order_after_the_data(ir):
    spec, _ = ir
    tasks = _tasks(spec)
    assert set(tasks) == {"data", *PIPELINE_STAGES, *CHECKPOINT_TASKS}
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    # validate and preprocess read the raw data itself: the manifest names the DICOMs inside it.
    assert depends == {"data": set(), "ingest": {"data"}, "validate": {"data", "ingest"},
                       "preprocess": {"data", "ingest", "validate"},
                       "train": {"preprocess", "validate", "check-checkpoint-volume"},
                       "evaluate": {"preprocess", "train"}, "export": {"preprocess", "train"},
                       "register": {"export", "evaluate", "preprocess"},  # the gate re-scores on the dataset
                       # The volume is checked at the start (no inputs), the run's folder removed after train.
                       "check-checkpoint-volume": set(), "remove-run-checkpoints": {"train"}}
    assert _images(spec) == {task: "mammoseg:cuda" if task == "train" else "mammoseg:cpu" for task in tasks}


def _images(spec: dict) -> dict[str, str]:
    """Task name -> the image its executor runs."""
    executors = spec["deploymentSpec"]["executors"]
    return {name: executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]["container"]["image"]
            for name, task in _tasks(spec).items()}


# A KFP placeholder: an input or output artifact's path, an input parameter, or a runtime value.
PLACEHOLDER = re.compile(r"\{\{\$\.(?:(inputs|outputs)\.(artifacts|parameters)\['(\w+)'\](?:\.path)?"
                         r"|pipeline_job_uuid)\}\}")
# A path of the machine that compiled the pipeline, or of a host: absolute, home-relative, or this checkout's.
HOST_PATH = re.compile(r"(?:^|[\s='\"(])(?:/[\w.~-]|~/|(?:\.\.?/)?(?:data|artifacts|metrics)/)")


def test_every_command_reads_only_what_its_task_declares(ir):
    """On a cluster a pod sees its declared input artifacts, at paths KFP chooses, and nothing else.

    So every path in a task's command line is a placeholder of an artifact or parameter its component
    declares (a file inside an artifact folder is `<placeholder>/name`); a path-valued parameter lies on
    a volume the task mounts; and every input flag of a stage reads an input artifact.
    """
    spec, platform = ir
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    for name, task in _tasks(spec).items():
        component = spec["components"][task["componentRef"]["name"]]
        container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        declared = {(kind, what): set(component.get(f"{'input' if kind == 'inputs' else 'output'}Definitions", {})
                                      .get(what, {}))
                    for kind in ("inputs", "outputs") for what in ("artifacts", "parameters")}
        for arg in [*container["command"], *container["args"]]:
            for match in PLACEHOLDER.finditer(arg):
                if match.group(1):
                    assert match.group(3) in declared[match.group(1), match.group(2)], (name, arg)
            literal = PLACEHOLDER.sub("<placeholder>", arg)
            assert not HOST_PATH.search(literal), (name, arg)
        mounts = {m["mountPath"] for m in platform.get(component["executorLabel"], {}).get("pvcMount", [])}
        for parameter, source in task["inputs"].get("parameters", {}).items():
            value = defaults.get(source.get("componentInputParameter"), {}).get("defaultValue")
            if isinstance(value, str) and value.startswith("/"):
                assert any(value == m or value.startswith(m + "/") for m in mounts), (name, parameter, value)
        if name in PIPELINE_STAGES:
            args = container["args"]
            for path in STAGES[name].paths:
                if path.flag in args and not path.flag.endswith("-out"):
                    value = args[args.index(path.flag) + 1]
                    match = PLACEHOLDER.match(value)
                    assert match and match.group(1, 2) == ("inputs", "artifacts"), (name, path.flag, value)


def test_the_input_check_sees_a_hard_coded_path():
    """HOST_PATH and PLACEHOLDER catch what the check above must refuse (a mutation check)."""
    assert HOST_PATH.search("/data/inbreast") and HOST_PATH.search("--inbreast=data/inbreast")
    assert HOST_PATH.search('"$(cat /etc/x)"') and HOST_PATH.search("~/inbreast")
    assert not HOST_PATH.search(PLACEHOLDER.sub("<placeholder>", "{{$.inputs.artifacts['manifest'].path}}/m.parquet"))
    assert not HOST_PATH.search('work="$(dirname "$3")/.dvc-fetch"')  # beside the output artifact


def test_train_requests_a_gpu_resources_and_retries(ir):
    spec, platform = ir
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    assert resources["resourceCpuRequest"] == SETTINGS["train_cpu_request"]
    assert resources["resourceMemoryRequest"] == SETTINGS["train_memory_request"]
    assert resources["resourceMemoryLimit"] == SETTINGS["train_memory_limit"]
    assert _tasks(spec)["train"]["retryPolicy"] == {
        "maxRetryCount": SETTINGS["train_retries"], "backoffDuration": SETTINGS["retry_backoff"],
        "backoffFactor": 2.0, "backoffMaxDuration": SETTINGS["retry_backoff_max"]}
    assert platform["exec-train"]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": SETTINGS["shm_size"], "volumeName": "dshm"}]
    # Retries are new pods: the checkpoint volume carries the state between attempts.
    (pvc,) = platform["exec-train"]["pvcMount"]
    assert pvc["mountPath"] == "/checkpoints" and pvc["constant"] == SETTINGS["checkpoint_pvc"]
    assert spec["root"]["inputDefinitions"]["parameters"]["checkpoint_dir"]["defaultValue"] == "/checkpoints"
    # Only train asks for a GPU.
    others = [e for name, e in spec["deploymentSpec"]["executors"].items() if name != "exec-train"]
    assert not any("accelerator" in e["container"].get("resources", {}) for e in others)


def _executor(spec: dict, task: str) -> str:
    return spec["components"][_tasks(spec)[task]["componentRef"]["name"]]["executorLabel"]


def test_train_runs_on_cuda_so_a_pod_without_a_gpu_fails_at_once(ir):
    spec, _ = ir
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert SETTINGS["train_device"] == "cuda" and parameters["train_device"]["defaultValue"] == "cuda"
    assert _tasks(spec)["train"]["inputs"]["parameters"]["device"] == {"componentInputParameter": "train_device"}
    args = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["args"]
    # After the block's own `device: auto` (a flag overrides the params file).
    assert args[args.index("--device") + 1] == "{{$.inputs.parameters['device']}}"
    assert json.loads(parameters["train_params"]["defaultValue"])["train"]["device"] == "auto"


def test_train_tolerates_the_gpu_taint_and_the_other_tasks_keep_off_gpu_nodes(ir):
    _, platform = ir
    assert platform["exec-train"]["tolerations"] == SETTINGS["train_tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert not any("nodeSelector" in e or "tolerations" in e for label, e in platform.items() if label != "exec-train")


def test_node_selectors_and_tolerations_are_compile_time_settings(tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out),
                 "-S", "pipeline.train_node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
                 "-S", "pipeline.train_tolerations=[{key: dedicated, operator: Equal, value: ml, effect: NoSchedule},"
                       " {key: spot, operator: Exists}]",
                 "-S", "pipeline.node_selector={pool: cpu}", "-S", "pipeline.tolerations=[{operator: Exists}]"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task in _tasks(spec):
        executor = executors[_executor(spec, task)]
        if task == "train":
            assert executor["nodeSelector"] == {"labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
            assert executor["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml",
                                                "effect": "NoSchedule"}, {"key": "spot", "operator": "Exists"}]
        else:
            assert executor["nodeSelector"] == {"labels": {"pool": "cpu"}}, task
            assert executor["tolerations"] == [{"operator": "Exists"}], task


def test_every_container_runs_as_the_images_user(ir, tmp_path):
    spec, platform = ir
    for task in _tasks(spec):
        assert platform[_executor(spec, task)]["securityContext"] == {
            "runAsUser": str(SETTINGS["run_as_user"]), "runAsGroup": str(SETTINGS["run_as_group"]),
            "runAsNonRoot": True}, task
    assert (SETTINGS["run_as_user"], SETTINGS["run_as_group"]) == (1000, 1000)  # the Dockerfile's USER 1000:1000
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "USER 1000:1000" in dockerfile
    # null leaves it out (a KFP 2.15 backend, which predates it).
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "-S", "pipeline.run_as_user=null",
                 "-S", "pipeline.run_as_group=null"]) == 0
    executors = list(yaml.safe_load_all(out.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert not any("securityContext" in e for e in executors.values())


def test_the_checkpoint_volume_is_checked_first_and_the_runs_folder_removed_after_train(ir, tmp_path):
    spec, platform = ir
    tasks = _tasks(spec)
    containers = {t: spec["deploymentSpec"]["executors"][_executor(spec, t)]["container"] for t in tasks}
    train_args = containers["train"]["args"]
    run_id = train_args[train_args.index("--pipeline-run-id") + 1]
    for task in CHECKPOINT_TASKS:
        # The same volume at the same place as train, the same folder (checkpoint_dir) and run id.
        assert platform[_executor(spec, task)]["pvcMount"] == platform["exec-train"]["pvcMount"]
        assert tasks[task]["inputs"]["parameters"]["checkpoint_dir"] == tasks["train"]["inputs"]["parameters"][
            "checkpoint_dir"] == {"componentInputParameter": "checkpoint_dir"}
        assert containers[task]["args"] == ["{{$.inputs.parameters['checkpoint_dir']}}", run_id]
        assert "resources" not in containers[task] or "accelerator" not in containers[task]["resources"]
    assert run_id == "{{$.pipeline_job_uuid}}"
    # The removal runs only when train succeeded: KFP's default trigger (all upstream tasks succeeded).
    assert tasks["remove-run-checkpoints"]["dependentTasks"] == ["train"]
    assert "triggerPolicy" not in tasks["remove-run-checkpoints"]
    # Without a volume the checkpoints stay in the model artifact, and neither task exists.
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "-S", "pipeline.checkpoint_pvc="]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert set(_tasks(spec)) == {"data", *PIPELINE_STAGES}


def test_secrets_are_environment_never_parameters_and_only_the_tracking_uri_is_required(ir):
    spec, platform = ir
    # KFP's driver puts each mapping's `optional` on every key's secretKeyRef (backend/src/v2/driver/k8s.go,
    # KFP 2.15+); Kubernetes then leaves out a key, or a whole secret, that is absent instead of failing the
    # pod: MLflow without credentials and S3 through the node's role need no keys.
    for stage in ("train", "evaluate", "export", "register"):
        secrets = platform[f"exec-{stage}"]["secretAsEnv"]
        assert {secret["secretName"] for secret in secrets} == {SETTINGS["mlflow_secret"]}
        assert {(key["secretKey"], key["envVar"], secret["optional"]) for secret in secrets
                for key in secret["keyToEnv"]} == {("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", False),
                                                   ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME", True),
                                                   ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD", True)}
    (secret,) = platform["exec-data"]["secretAsEnv"]
    assert secret["secretName"] == SETTINGS["s3_secret"] and secret["optional"] is True
    assert [(k["secretKey"], k["envVar"]) for k in secret["keyToEnv"]] == [(k, k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")]
    # The driver reads this config with the same message type: every field is one it knows.
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2

    for executor in platform.values():
        json_format.ParseDict(executor, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    text = json.dumps(parameters).upper()
    assert not any(word in text for word in ("PASSWORD", "SECRET", "ACCESS_KEY", "TRACKING_URI"))


def test_caching_parameters_reach_every_task(ir):
    spec, _ = ir
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    data_dvc = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())
    assert parameters["data_hash"]["defaultValue"] == data_dvc["outs"][0]["md5"]
    assert parameters["data_uri"]["defaultValue"] == SETTINGS["data_remote"]
    assert parameters["image_digest"]["defaultValue"] == "sha256:" + "ab" * 32
    assert parameters["train_image_digest"]["defaultValue"] == ""  # mammoseg:cuda, a tag, and no digest given
    tasks = _tasks(spec)
    for name, task in tasks.items():
        # Each stage keys on its own image's digest: train on the CUDA image's.
        digest = {"train": "train_image_digest"}.get(name, "image_digest")
        if name not in CHECKPOINT_TASKS:
            assert task["inputs"]["parameters"]["image_digest"] == {"componentInputParameter": digest}, name
    assert tasks["data"]["inputs"]["parameters"]["data_hash"] == {"componentInputParameter": "data_hash"}
    # Everything downstream of the data is keyed on it through the artifacts; register acts on the
    # registry's current state, the checkpoint tasks on the volume's: never served from the cache.
    assert {n for n, t in tasks.items() if t["cachingOptions"].get("enableCache")} == (
        set(tasks) - {"register", *CHECKPOINT_TASKS})


# The lineage inputs of train and register, and the pipeline parameter each one takes.
LINEAGE_SOURCES = {"git_commit": "git_commit", "git_dirty": "git_dirty", "data_dvc_hash": "data_hash"}
INPUT_PARAMETER = re.compile(r"\{\{\$\.inputs\.parameters\['(\w+)'\]\}\}")


def _with_values(arg: str, values: dict[str, str]) -> str:
    """Replace the input parameter placeholders of `values` in a command-line argument by their values."""
    return INPUT_PARAMETER.sub(lambda m: values.get(m.group(1), m.group(0)), arg)


def test_lineage_reaches_train_and_register_as_the_checkouts_at_compile_time(ir, tmp_path):
    """The images hold no checkout: what train tags its run with comes in as parameters, read by the CLI."""
    from mammoseg import tracking
    from mammoseg.cli import build_parser

    spec, _ = ir
    defaults = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    commit, dirty = tracking.git_state(REPO_ROOT)
    assert len(commit) == 40 and (defaults["git_commit"], defaults["git_dirty"]) == (commit, str(dirty))
    for name, digest in (("train", "train_image_digest"), ("register", "image_digest")):
        sources = {**LINEAGE_SOURCES, "image_digest": digest}
        inputs = _tasks(spec)[name]["inputs"]["parameters"]
        assert {key: inputs[key] for key in sources} == {
            key: {"componentInputParameter": source} for key, source in sources.items()}, name
        # The task's command line with the parameters at their defaults, as mammoseg's CLI reads it,
        # resolved where no checkout is (a pod): exactly the compile-time values.
        args = spec["deploymentSpec"]["executors"][_executor(spec, name)]["container"]["args"]
        values = {key: defaults[source] for key, source in sources.items()}
        namespace = build_parser().parse_args([_with_values(arg, values) for arg in args[1:]])
        with tracking.given_lineage(**{key: getattr(namespace, key) for key in sources}):
            assert tracking.lineage(tmp_path) == tracking.Lineage(
                commit, str(dirty), defaults["data_hash"], defaults[digest] or "unknown"), name
    # ir compiled train's image as a tag without a digest: train's run says "unknown", not "none".
    assert defaults["train_image_digest"] == "" and defaults["image_digest"] == "sha256:" + "ab" * 32


def test_compile_time_git_state_follows_the_stages_rule(git_checkout, tmp_path):
    """pipelines/ reads the checkout itself (it imports no mammoseg): the same answer as the stages'."""
    from mammoseg import tracking
    from pipelines.settings import read_git_state
    from tests.conftest import run_git

    (git_checkout / "new.txt").write_text("untracked: not a change of the code at this commit\n")
    assert read_git_state(git_checkout) == (run_git(git_checkout, "rev-parse", "HEAD"), "False")
    (git_checkout / "code.py").write_text("x = 2\n")
    commit, dirty = tracking.git_state(git_checkout)
    assert read_git_state(git_checkout) == (commit, str(dirty)) == (commit, "True")
    # Compiled outside any checkout: nothing to read, and the lineage says so.
    outside = tmp_path / "no-checkout"
    outside.mkdir()
    (outside / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    assert read_git_state(outside) == ("unknown", "unknown")
    assert main(["--params", str(outside / "params.yaml"), "compile", "--output", str(tmp_path / "p.yaml")]) == 0
    parameters = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))["root"]["inputDefinitions"]["parameters"]
    assert (parameters["git_commit"]["defaultValue"], parameters["git_dirty"]["defaultValue"]) == ("unknown", "unknown")


def test_each_stage_gets_its_own_params_block(ir):
    spec, _ = ir
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    for stage in PIPELINE_STAGES:
        assert _tasks(spec)[stage]["inputs"]["parameters"]["params"] == {
            "componentInputParameter": f"{stage}_params"}
        block = json.loads(parameters[f"{stage}_params"]["defaultValue"])
        expected = dict(PARAMS[stage], epochs=3) if stage == "train" else PARAMS[stage]
        assert block == {stage: expected}


def test_compiling_imports_neither_torch_nor_mammoseg(tmp_path):
    code = ("import sys; from pathlib import Path; from pipelines.cli import main; "
            f"assert main(['compile', '--output', {str(tmp_path / 'p.yaml')!r}]) == 0; "
            "from pipelines.settings import load_compile_inputs; from pipelines.training import compile_pipeline; "
            f"compile_pipeline(Path({str(tmp_path / 'q.yaml')!r}), load_compile_inputs()); "
            "imported = [m for m in sys.modules if m.split('.')[0] in ('torch', 'mammoseg')]; "
            "assert not imported, imported")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "p.yaml").read_text() == (tmp_path / "q.yaml").read_text()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_the_pipeline_has_its_own_command_and_kfp_is_its_extra(tmp_path):
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    # The images install `dependencies` only (scripts/build_image.sh): no kfp in a stage's image.
    assert not _requirement_names(project["dependencies"]) & {"kfp", "kfp-kubernetes"}
    assert {"kfp", "kfp-kubernetes"} <= _requirement_names(project["optional-dependencies"]["pipeline"])
    assert project["scripts"] == {"mammoseg": "mammoseg.cli:main", "mammoseg-pipeline": "pipelines.__main__:main"}
    script = Path(sys.executable).parent / "mammoseg-pipeline"
    proc = subprocess.run([str(script), "compile", "--output", str(tmp_path / "p.yaml")], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "p.yaml"), proc.stderr[-2000:]
    # Where the extra is missing (a stage image), the command says what to install, in one line.
    code = ("import sys; sys.modules['kfp'] = None; sys.argv = ['mammoseg-pipeline', 'compile']; "
            "from pipelines.__main__ import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "mammoseg-pipeline: error: kfp and kfp-kubernetes are not installed; they come with the pipeline extra: "
        "pip install 'mammoseg[pipeline]'"]


CPU_REF = "registry.local:5000/mammoseg@sha256:" + "c" * 64
CUDA_REF = "registry.local:5000/mammoseg:cuda-1@sha256:" + "d" * 64


def test_train_gets_the_train_image_and_the_digests_come_from_the_references(tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--image", CPU_REF, "--train-image", CUDA_REF]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert _images(spec) == {task: CUDA_REF if task == "train" else CPU_REF for task in _tasks(spec)}
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["image_digest"]["defaultValue"] == "sha256:" + "c" * 64
    assert parameters["train_image_digest"]["defaultValue"] == "sha256:" + "d" * 64


@pytest.mark.parametrize(("argv", "message"), [
    (["--image", "mammoseg@sha256:abc"], "expected repo@sha256:<64 hex digits> after the '@'"),
    (["--image", CPU_REF, "--image-digest", "sha256:" + "e" * 64], "contradicts the digest in"),
    (["--train-image-digest", "abc"], "--train-image-digest 'abc': expected sha256:<64 hex digits>"),
])
def test_bad_image_options_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(["compile", "--output", str(tmp_path / "p.yaml"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """Run `python -m pipelines ARGV` as a user would (a fresh process: exit code, stderr as printed)."""
    return subprocess.run([sys.executable, "-m", "pipelines", *argv], capture_output=True, text=True, cwd=REPO_ROOT,
                          check=False, timeout=300)


@pytest.mark.slow
def test_submit_refuses_a_mutable_tag_in_one_line_before_anything_is_sent(tmp_path):
    from tests.conftest import free_port

    host = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would be a different error
    for argv in (["--image", CPU_REF],  # train keeps its default, the tag mammoseg:cuda
                 ["--image", "registry.local/mammoseg:latest", "--train-image", CUDA_REF]):
        proc = _cli("submit", "--host", host, *argv)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("mammoseg-pipeline: error: ") and "image given by a mutable tag" in proc.stderr
        assert "--allow-mutable-tag" in proc.stderr and "Traceback" not in proc.stderr
    # A package compiled from tags is refused the same way: submit reads the images the nodes will pull.
    package = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(package), "--train-image", CUDA_REF]) == 0
    proc = _cli("submit", "--host", host, "--package", str(package))
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "mammoseg-pipeline: error: mammoseg:cpu: image given by a mutable tag; a retry or another node may pull "
        "another image under it: give repo@sha256:<digest> (docker inspect --format '{{index .RepoDigests 0}}' "
        "IMAGE, after docker push) or pass --allow-mutable-tag"]
    # With the flag the tags go through (to the unreachable endpoint here).
    proc = _cli("submit", "--host", host, "--package", str(package), "--allow-mutable-tag")
    assert proc.returncode == 2 and "mutable tag (--allow-mutable-tag)" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"mammoseg-pipeline: error: KFP endpoint {host} unreachable")


def test_submit_takes_no_image_for_a_compiled_package(tmp_path, capsys):
    assert main(["submit", "--host", "http://kfp", "--package", str(tmp_path / "p.yaml"), "--image", CPU_REF]) == 2
    assert capsys.readouterr().err.strip() == ("mammoseg-pipeline: error: --image and --train-image are compiled "
                                               "into a package; they cannot apply to --package")


def test_image_references():
    from pipelines.images import ImageError, mutable_images, reference_digest

    digest = "sha256:" + "0123456789abcdef" * 4
    assert reference_digest(f"ghcr.io/org/mammoseg@{digest}") == digest
    assert reference_digest(f"localhost:5000/mammoseg:cuda@{digest}") == digest  # tag and digest: the digest wins
    assert reference_digest("localhost:5000/mammoseg") == reference_digest("mammoseg:latest") == ""
    for bad in ("", " mammoseg:cpu", "@" + digest, "mammoseg@sha256:" + "A" * 64, "mammoseg@md5:" + "0" * 32):
        with pytest.raises(ImageError):
            reference_digest(bad)
    assert mutable_images({"a": f"r/m@{digest}", "b": "r/m:1"}) == {"b": "r/m:1"}


@pytest.mark.parametrize(("override", "message"), [
    ("train.no_such_key=1", "params.yaml has no 'train: no_such_key:'"),
    ("epochs=3", "expected STAGE.KEY=VALUE"),
    ("train.epochs=[1", "the value is not YAML"),
    ("pipeline.train_device=auto", "pipeline.train_device: expected cuda, cuda:N or cpu"),
    ("pipeline.train_node_selector={gpu: true}", "pipeline.train_node_selector: expected a mapping"),
    ("pipeline.train_tolerations=[{key: k, operator: In}]", "operator 'In' is not one of"),
    ("pipeline.tolerations=[{key: k, effect: NoRun}]", "effect 'NoRun' is not one of"),
    ("pipeline.tolerations=[{key: k, operator: Exists, value: v}]", "operator Exists takes no value"),
    ("pipeline.tolerations=[{value: v}]", "a toleration without a key needs operator Exists"),
    ("pipeline.tolerations=[{key: k, seconds: 3}]", "is not a mapping of key, operator"),
    ("pipeline.run_as_user=-1", "pipeline.run_as_user: expected a uid/gid >= 0 or null"),
])
def test_bad_overrides_are_one_line_errors(override, message, tmp_path, capsys):
    assert main(["compile", "--output", str(tmp_path / "p.yaml"), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


class _FakeClient:
    """Records what submit() asks of kfp.Client (no KFP API server here)."""

    def __init__(self):
        self.calls = []

    def create_experiment(self, name, namespace=None):
        self.calls.append(("experiment", name))
        return type("Experiment", (), {"experiment_id": "exp-1"})()

    def create_run_from_pipeline_package(self, package, **kwargs):
        self.calls.append(("run", package, kwargs))
        return type("Run", (), {"run_id": "run-1"})()

    def create_recurring_run(self, **kwargs):
        self.calls.append(("recurring", kwargs))
        return type("RecurringRun", (), {"recurring_run_id": "rec-1"})()


def test_submit_creates_a_run_or_a_recurring_run(tmp_path):
    from pipelines.submit import submit

    package = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(package)]) == 0
    client = _FakeClient()
    done = submit(package, "http://kfp", "mammoseg", {"data_hash": "h.dir"}, "nightly", client=client)
    assert (done.kind, done.id, done.experiment) == ("run", "run-1", "exp-1")
    assert client.calls[1][2]["arguments"] == {"data_hash": "h.dir"}
    assert client.calls[1][2]["experiment_id"] == "exp-1"
    done = submit(package, "http://kfp", "mammoseg", {}, "nightly", schedule="0 0 3 * * 1", client=client)
    assert (done.kind, done.id) == ("recurring run", "rec-1")
    recurring = client.calls[-1][1]
    assert recurring["cron_expression"] == "0 0 3 * * 1" and recurring["pipeline_package_path"] == str(package)
    assert recurring["experiment_id"] == "exp-1" and recurring["max_concurrency"] == 1


def test_local_run_helpers():
    from pipelines.local import docker_size, forwarded_environment

    assert docker_size("8Gi") == "8g" and docker_size("512Mi") == "512m"
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k", "HOME": "/root",
           "MLFLOW_TRACKING_PASSWORD": ""}
    assert forwarded_environment(env) == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k"}


def test_submit_to_an_unreachable_endpoint_is_a_one_line_error(tmp_path, capsys):
    from tests.conftest import free_port

    host = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", "--host", host, "--image", CPU_REF, "--train-image", CUDA_REF]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mammoseg-pipeline: error: KFP endpoint {host} unreachable")
