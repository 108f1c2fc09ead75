"""Compile-time settings: reads params.yaml (the stage blocks and `pipeline:`) and data.dvc.

The pipeline's defaults are taken from here when it is compiled: each stage's params.yaml block
becomes the default of one pipeline parameter (one-line JSON), the data hash comes from data.dvc, the
git commit and dirty state from the checkout holding params.yaml (the lineage train and register
record: their image has no checkout), and the `pipeline:` block sets names, resources, retries and
secrets. `--set stage.key=value` edits a block
before that, like `dvc exp run -S`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from components import STAGE_COMPONENTS

REPO_ROOT = Path(__file__).resolve().parents[1]

@dataclasses.dataclass(frozen=True)
class SecretKeys:
    """The keys of one Kubernetes secret that a task maps to environment variables of the same names.

    Attributes:
        required: keys the secret must hold: without one the pod does not start
            (CreateContainerConfigError names the key), rather than run against the wrong service.
        optional: keys mapped only where the secret holds them (a secretKeyRef with optional: true;
            the secret itself may then be absent too).
    """

    required: tuple[str, ...]
    optional: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Every variable name, required first."""
        return (*self.required, *self.optional)


# Environment variables the stages read, by the Kubernetes secret that provides them (keys = names).
# The local run forwards the same names from the caller's environment, where they are set.
# MLflow: the tracking URI is required (without it a stage would log to a throw-away SQLite file in
# its pod); the credentials are optional, for a server without authentication.
MLFLOW_ENV = SecretKeys(required=("MLFLOW_TRACKING_URI",),
                        optional=("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
# S3: all optional. Without keys boto3 (under DVC) takes the node's instance role or the pod's web
# identity (IRSA); without a region or endpoint, AWS's defaults (the endpoint is for MinIO and the like).
S3_ENV = SecretKeys(required=(), optional=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_ENDPOINT_URL_S3"))


class SettingsError(ValueError):
    """A params.yaml, data.dvc or --set problem, as one line naming the file or the key."""


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """The `pipeline:` block of params.yaml, typed; no defaults here (params.yaml holds them)."""

    name: str
    data_remote: str
    mlflow_secret: str
    s3_secret: str
    cpu_request: str
    memory_request: str
    train_cpu_request: str
    train_memory_request: str
    train_memory_limit: str
    accelerator_type: str
    accelerator_limit: int
    shm_size: str
    train_retries: int
    checkpoint_pvc: str
    retry_backoff: str
    retry_backoff_max: str
    experiment: str
    train_device: str
    train_node_selector: dict[str, str]
    train_tolerations: list[dict[str, Any]]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    run_as_user: int | None
    run_as_group: int | None
    trainjob_runtime: str
    train_nodes: int
    train_gpus_per_node: int
    trainjob_timeout: int


# What Kubernetes accepts in a toleration (kfp.kubernetes.add_toleration's arguments).
TOLERATION_KEYS = ("key", "operator", "value", "effect", "toleration_seconds")
TOLERATION_OPERATORS = ("Equal", "Exists")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# mammoseg's train.device values (auto is refused here: it would let train fall back to the CPU in silence).
TRAIN_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _check_node_selector(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SettingsError(f"pipeline.{name}: expected a mapping of node label -> value, both strings "
                            f"(quote values such as 'true'), got {value!r}")


def _check_tolerations(name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise SettingsError(f"pipeline.{name}: expected a list of tolerations, got {value!r}")
    for toleration in value:
        if not isinstance(toleration, dict) or not set(toleration) <= set(TOLERATION_KEYS):
            raise SettingsError(f"pipeline.{name}: {toleration!r} is not a mapping of {', '.join(TOLERATION_KEYS)}")
        operator = toleration.get("operator", "Equal")
        if operator not in TOLERATION_OPERATORS:
            raise SettingsError(f"pipeline.{name}: operator {operator!r} is not one of {TOLERATION_OPERATORS}")
        if toleration.get("effect", TAINT_EFFECTS[0]) not in TAINT_EFFECTS:
            raise SettingsError(f"pipeline.{name}: effect {toleration['effect']!r} is not one of {TAINT_EFFECTS}")
        if operator == "Exists" and toleration.get("value"):
            raise SettingsError(f"pipeline.{name}: {toleration!r}: operator Exists takes no value")
        if not toleration.get("key") and operator != "Exists":
            raise SettingsError(f"pipeline.{name}: {toleration!r}: a toleration without a key needs operator Exists")


def check_settings(settings: PipelineSettings) -> None:
    """Refuse `pipeline:` values that the compiled pipeline could not apply, with one line naming the key.

    Raises:
        SettingsError: a malformed node selector, toleration, device, uid/gid or TrainJob size, or a
            TrainJob without the checkpoint volume it exchanges files through.
    """
    if not isinstance(settings.train_device, str) or not TRAIN_DEVICE.fullmatch(settings.train_device):
        raise SettingsError(f"pipeline.train_device: expected cuda, cuda:N or cpu, got {settings.train_device!r}")
    for name in ("train_node_selector", "node_selector"):
        _check_node_selector(name, getattr(settings, name))
    for name in ("train_tolerations", "tolerations"):
        _check_tolerations(name, getattr(settings, name))
    for name in ("run_as_user", "run_as_group"):
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SettingsError(f"pipeline.{name}: expected a uid/gid >= 0 or null, got {value!r}")
    for name, least in (("train_nodes", 1), ("train_gpus_per_node", 1), ("trainjob_timeout", 60)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SettingsError(f"pipeline.{name}: expected a whole number >= {least}, got {value!r}")
    if settings.trainjob_runtime and not settings.checkpoint_pvc:
        raise SettingsError("pipeline.trainjob_runtime: a TrainJob's pods get no KFP artifacts; they read the "
                            "inputs from, and write the model to, the checkpoint volume: set pipeline.checkpoint_pvc")


@dataclasses.dataclass(frozen=True)
class CompileInputs:
    """Everything the pipeline's definition takes from the repository at compile time.

    Attributes:
        pipeline: the `pipeline:` block.
        stage_params: stage name -> its params.yaml block as one-line JSON (the parameter defaults).
        data_hash: the directory hash of data/inbreast from data.dvc ("" when there is none).
        git_commit: the checkout's HEAD ("unknown" outside a git checkout).
        git_dirty: "True" when tracked files differ from HEAD, "False", "unknown" outside a checkout.
    """

    pipeline: PipelineSettings
    stage_params: dict[str, str]
    data_hash: str
    git_commit: str
    git_dirty: str


def parse_set(assignments: Iterable[str]) -> dict[str, Any]:
    """Parse `stage.key=value` overrides; values are YAML (`8`, `true`, `[332x256, 408x332]`)."""
    overrides: dict[str, Any] = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        if not sep or "." not in key:
            raise SettingsError(f"--set {text!r}: expected STAGE.KEY=VALUE (e.g. train.epochs=2)")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SettingsError(f"--set {text!r}: the value is not YAML ({str(exc).splitlines()[0]})") from None
    return overrides


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of params with `block.key` overrides applied; a key must already exist."""
    result = {name: dict(block) if isinstance(block, dict) else block for name, block in params.items()}
    for dotted, value in overrides.items():
        block_name, key = dotted.split(".", 1)
        block = result.get(block_name)
        if not isinstance(block, dict) or key not in block:
            raise SettingsError(f"--set {dotted}: params.yaml has no '{block_name}: {key}:' to override")
        block[key] = value
    return result


def read_data_hash(data_dvc: Path) -> str:
    """Return the directory hash (`outs[0].md5`) recorded in a .dvc file, "" when the file is absent."""
    if not data_dvc.is_file():
        return ""
    try:
        outs = (yaml.safe_load(data_dvc.read_text()) or {}).get("outs") or []
        return str(outs[0]["md5"])
    except (yaml.YAMLError, AttributeError, IndexError, KeyError, TypeError):
        raise SettingsError(f"{data_dvc}: no outs[0].md5 (not a .dvc file of one directory)") from None


def read_git_state(checkout: Path) -> tuple[str, str]:
    """Return (HEAD, "True"|"False" dirty) of the git checkout holding a folder; ("unknown", "unknown") if none.

    The rule of mammoseg.tracking.git_state, which a stage applies where it runs from a checkout (this
    package does not import mammoseg; tests/pipelines hold the two to the same answer).
    """
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=checkout, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown", "unknown"
    return commit, str(bool(status))


def load_compile_inputs(params_path: Path | None = None, overrides: Mapping[str, Any] | None = None,
                        data_dvc: Path | None = None) -> CompileInputs:
    """Read params.yaml (with overrides) and data.dvc into the pipeline's compile-time inputs.

    Args:
        params_path: params.yaml; default the repository's own.
        overrides: `block.key` -> value, applied before anything is read from the blocks.
        data_dvc: the .dvc file of the raw data; default data.dvc beside params.yaml.

    Raises:
        SettingsError: a file is missing or malformed, a block or key does not exist.
    """
    params_path = params_path or REPO_ROOT / "params.yaml"
    try:
        params = yaml.safe_load(params_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{params_path}: cannot read ({str(exc).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise SettingsError(f"{params_path}: expected a mapping of blocks")
    params = apply_overrides(params, overrides or {})
    block = params.get("pipeline")
    fields = {f.name for f in dataclasses.fields(PipelineSettings)}
    if not isinstance(block, dict) or set(block) != fields:
        have = set(block) if isinstance(block, dict) else set()
        raise SettingsError(f"{params_path}: 'pipeline:' block needs exactly the keys {sorted(fields)} "
                            f"(missing {sorted(fields - have)}, unknown {sorted(have - fields)})")
    stage_params = {}
    for stage in STAGE_COMPONENTS:
        if not isinstance(params.get(stage), dict):
            raise SettingsError(f"{params_path}: no '{stage}:' block")
        # One line of JSON (which is YAML): KFP's IR header repeats every default in a `#` comment, and a
        # multi-line default would break the YAML out of that comment.
        stage_params[stage] = json.dumps({stage: params[stage]}, separators=(",", ":"))
    data_dvc = data_dvc or params_path.parent / "data.dvc"
    settings = PipelineSettings(**block)
    check_settings(settings)
    return CompileInputs(settings, stage_params, read_data_hash(data_dvc), *read_git_state(params_path.parent))
