"""The only module that talks to MLflow: runs, params, metrics, lineage tags, artifacts, the registry.

The tracking URI and credentials come only from the environment (`MLFLOW_TRACKING_URI`,
`MLFLOW_TRACKING_USERNAME`/`PASSWORD`); without a URI the embedded default is a SQLite store under
`artifacts/` with local artifacts beside it (MLflow 3 refuses a plain file store). `train` opens the
run; evaluate, export and register continue it through the run id recorded with the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mammoseg.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("artifacts")
RUN_ID_FILE = "mlflow_run.json"
# Bounded retries against an unreachable server: MLflow's own defaults retry for minutes.
_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def tracking_uri() -> str:
    """Return the tracking URI: $MLFLOW_TRACKING_URI, else the embedded SQLite store under artifacts/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _configure() -> str:
    """Point the MLflow client at the tracking URI with bounded retries; return the URI."""
    import mlflow

    for key, value in _RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _redact(uri: str) -> str:
    """Drop user:password from a URI before it goes into a message or a log line."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


@contextlib.contextmanager
def _server_errors(action: str) -> Iterator[None]:
    """Turn MLflow's connection and auth failures into one-line user errors."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "error code 401" in str(exc) or "error code 403" in str(exc) or "not authenticated" in str(exc):
            raise UserError(f"MLflow tracking server {_redact(tracking_uri())} refused the credentials "
                            f"while {action} (set MLFLOW_TRACKING_USERNAME/PASSWORD)") from None
        if "Max retries" in str(exc) or "Connection" in str(exc) or "API request" in str(exc):
            raise UserError(f"MLflow tracking server {_redact(tracking_uri())} unreachable while {action} "
                            f"({text[:200]})") from None
        raise


def git_state(repo: Path | None = None) -> tuple[str, bool]:
    """Return (commit, dirty) of the git checkout holding `repo` (cwd by default); ("unknown", False) if none.

    Dirty means the code differs from the commit: a tracked file changed that DVC does not write
    itself. `dvc repro` rewrites dvc.lock and the outputs that dvc.yaml declares and git tracks (the
    metrics files, a plot's data) before train tags its run, so on a clean clone those never count.
    """
    cwd = repo or Path.cwd()
    try:
        commit = _git(cwd, "rev-parse", "HEAD").strip()
        top = Path(_git(cwd, "rev-parse", "--show-toplevel").strip())
        status = _git(cwd, "status", "--porcelain=v1", "-z", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    written = dvc_written_paths(top)
    return commit, any(not _under(path, written) for path in _changed_paths(status))


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _changed_paths(porcelain_z: str) -> list[str]:
    """The paths (relative to the repository root) in `git status --porcelain=v1 -z` output.

    A rename or copy entry ("R  NEW", then "OLD" as its own field) gives both paths.
    """
    fields, paths = porcelain_z.split("\0"), []
    index = 0
    while index < len(fields):
        entry = fields[index]
        index += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if {"R", "C"} & set(entry[:2]) and index < len(fields):
            paths.append(fields[index])
            index += 1
    return paths


def dvc_written_paths(root: Path) -> set[str]:
    """Return the files and folders DVC writes in a project (paths relative to its root).

    dvc.lock, and every `outs`, `metrics` and `plots` entry of dvc.yaml's stages, plus the data files
    of its top-level `plots`. Entries with `${...}` are left out: they need params to resolve, and an
    unresolved path matching nothing only makes the check stricter.
    """
    written = {"dvc.lock"}
    path = root / "dvc.yaml"
    try:
        pipeline = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return written
    for stage in (pipeline.get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            written.update(_entry_paths(stage.get(key) or []))
    for plot in pipeline.get("plots") or []:
        if isinstance(plot, Mapping):
            for name, spec in plot.items():
                y = spec.get("y") if isinstance(spec, Mapping) else None
                written.update(y if isinstance(y, Mapping) else [name])
        else:
            written.add(str(plot))
    return {entry.rstrip("/") for entry in written if "${" not in entry}


def _entry_paths(entries: list[Any]) -> list[str]:
    """dvc.yaml list entries are a path or a one-key mapping {path: options}."""
    return [str(next(iter(entry))) if isinstance(entry, Mapping) else str(entry) for entry in entries]


def _under(path: str, roots: set[str]) -> bool:
    return any(path == root or path.startswith(root + "/") for root in roots)


def dvc_data_hash(repo: Path | None = None) -> str | None:
    """Return the DVC hash of the raw data: data.dvc's md5, else the dvc.lock ingest dependency on data/."""
    root = repo or Path.cwd()
    data_dvc = root / "data.dvc"
    if data_dvc.is_file():
        outs = (yaml.safe_load(data_dvc.read_text()) or {}).get("outs") or []
        if outs and outs[0].get("md5"):
            return str(outs[0]["md5"])
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
        for dep in (stages.get("ingest") or {}).get("deps") or []:
            if str(dep.get("path", "")).startswith("data") and dep.get("md5"):
                return str(dep["md5"])
    return None


# --- Lineage: what a training run (and so a registered version) was made from -----------------------

# The values a lineage tag takes when it is not known; a stage never guesses.
UNKNOWN, UNTRACKED, NO_IMAGE = "unknown", "untracked", "none"
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 and SHA-256 repositories
_DATA_HASH = re.compile(r"[0-9a-f]{32}(\.dir)?")  # DVC's md5: data.dvc's <md5>.dir for a folder
_IMAGE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class Lineage:
    """What a run or a registry version was made from, as the text of its tags.

    Attributes:
        git_commit: the commit of the code; "unknown" outside a git checkout.
        git_dirty: "True" when tracked files differ from the commit, "False", or "unknown".
        data_dvc_hash: the DVC hash of the raw data (data.dvc's `<md5>.dir`); "untracked" without one.
        image_digest: the container image the stage ran in (sha256:...); "none" when none was given
            (a run from a checkout), "unknown" for an image whose digest its orchestrator did not know.
    """

    git_commit: str
    git_dirty: str
    data_dvc_hash: str
    image_digest: str

    def tags(self) -> dict[str, str]:
        """Return the lineage as tags (their names are the field names)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Lineage:
        """Read the lineage a training run was tagged with ("unknown" for a tag it lacks: an older run)."""
        return cls(**{field.name: tags.get(field.name) or UNKNOWN for field in dataclasses.fields(cls)})


# What `mammoseg train|register` were given on their command line (--git-commit ...): set by the CLI
# around the stage call, read by `lineage()`. A context variable, so a stage function's signature
# stays paths and config, and an in-process call (tests) never leaks it to the next one.
_GIVEN_LINEAGE: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("given_lineage",
                                                                                         default=None)


def _given_value(name: str, value: str, pattern: re.Pattern[str], empty: str, what: str) -> str:
    """Check one given lineage value; "" and the field's own 'not known' word mean not known."""
    if value in ("", empty):
        return empty
    if not pattern.fullmatch(value):
        raise UserError(f"--{name.replace('_', '-')} {value!r}: expected {what}")
    return value


@contextlib.contextmanager
def given_lineage(git_commit: str | None = None, git_dirty: str | None = None, data_dvc_hash: str | None = None,
                  image_digest: str | None = None) -> Iterator[None]:
    """Within the block, `lineage()` returns these values (None: not given) over the checkout's.

    Orchestrators whose stages run without the checkout (KFP pods: no .git, no data.dvc) give them;
    "" stands for a value they do not know either ("unknown", or "untracked" for the data hash).

    Raises:
        UserError: a value that is not a commit, true/false, a DVC hash or an image digest.
    """
    values: dict[str, str] = {}
    if git_commit is not None:
        values["git_commit"] = _given_value("git_commit", git_commit.lower(), _COMMIT, UNKNOWN,
                                            "a full git commit (40 or 64 hex digits)")
    if git_dirty is not None:
        dirty = {"true": "True", "false": "False", "": UNKNOWN, UNKNOWN: UNKNOWN}.get(git_dirty.lower())
        if dirty is None:
            raise UserError(f"--git-dirty {git_dirty!r}: expected true or false")
        values["git_dirty"] = dirty
    if data_dvc_hash is not None:
        values["data_dvc_hash"] = _given_value("data_dvc_hash", data_dvc_hash, _DATA_HASH, UNTRACKED,
                                               "a DVC md5 (<32 hex digits>.dir for a folder, as in data.dvc)")
    if image_digest is not None:
        values["image_digest"] = _given_value("image_digest", image_digest, _IMAGE_DIGEST, UNKNOWN,
                                              "sha256:<64 hex digits>")
    token = _GIVEN_LINEAGE.set(values)
    try:
        yield
    finally:
        _GIVEN_LINEAGE.reset(token)


def lineage(repo: Path | None = None) -> Lineage:
    """Return this stage's lineage: the values given to it (`given_lineage`), else the checkout's.

    The dirty state comes from the checkout only with its commit: the checkout's state says nothing
    about a commit given from elsewhere.

    Args:
        repo: the checkout (cwd by default).
    """
    given = _GIVEN_LINEAGE.get() or {}
    if "git_commit" in given:
        commit, dirty = given["git_commit"], given.get("git_dirty", UNKNOWN)
    else:
        commit, is_dirty = git_state(repo)
        dirty = given.get("git_dirty", UNKNOWN if commit == UNKNOWN else str(is_dirty))
    data_hash = given["data_dvc_hash"] if "data_dvc_hash" in given else dvc_data_hash(repo) or UNTRACKED
    return Lineage(commit, dirty, data_hash, given.get("image_digest", NO_IMAGE))


@dataclasses.dataclass
class Run:
    """A handle on one MLflow run (the active run inside `training_run` / `continue_run`)."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified; nested mappings flattened with dots)."""
        import mlflow

        flat = _flatten(params)
        with _server_errors("logging params"):
            mlflow.log_params({k: _param_text(v) for k, v in flat.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the run (None values are skipped)."""
        import mlflow

        with _server_errors("setting tags"):
            mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at a step."""
        import mlflow

        with _server_errors("logging metrics"):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (recursively) to the run's artifacts."""
        import mlflow

        with _server_errors(f"uploading {path}"):
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)

    def log_dataset(self, frame, name: str, digest: str, source: str, context: str) -> None:
        """Record a dataset input (mlflow.log_input) with its name, digest and source."""
        import mlflow
        from mlflow.data.pandas_dataset import from_pandas

        dataset = from_pandas(frame, source=source, name=name, digest=digest[:36])
        with _server_errors("logging the dataset input"):
            mlflow.log_input(dataset, context=context)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return text[:6000]  # MLflow's param value limit


def _experiment_id(name: str, uri: str) -> str:
    """Get or create the experiment; the embedded store keeps artifacts under artifacts/mlartifacts."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if _is_embedded(uri):
        location = (DEFAULT_STORE_DIR / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def training_run(experiment: str, run_name: str, log_system_metrics: bool = True) -> Iterator[Run]:
    """Open a new run; on any exception mark it FAILED (never leave it RUNNING) and re-raise.

    Args:
        experiment: experiment name (created when missing).
        run_name: a readable name for the MLflow UI.
        log_system_metrics: sample CPU/GPU memory and utilisation in the background.
    """
    import mlflow

    uri = _configure()
    if os.environ.get("MLFLOW_RUN_ID"):
        # Under `mlflow run`, the project's run is the training run: log into it.
        with continue_run(os.environ["MLFLOW_RUN_ID"]) as run:
            yield run
        return
    with _server_errors("starting the run"):
        experiment_id = _experiment_id(experiment, uri)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                  log_system_metrics=log_system_metrics)
    log.info("MLflow run %s in experiment %r at %s", active.info.run_id, experiment, _redact(uri))
    yield from _finish(active)


@contextlib.contextmanager
def continue_run(run_id: str) -> Iterator[Run]:
    """Re-open an existing run (evaluate, export and register log into the training run)."""
    import mlflow

    _configure()
    with _server_errors(f"re-opening run {run_id}"):
        active = mlflow.start_run(run_id=run_id)
    yield from _finish(active)


def _finish(active) -> Iterator[Run]:
    import mlflow

    try:
        yield Run(active.info.run_id)
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def write_run_id(model_dir: Path, run_id: str) -> Path:
    """Record the run id next to the model so later stages continue the same run."""
    path = model_dir / RUN_ID_FILE
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": _redact(tracking_uri())}) + "\n")
    return path


def read_run_id(model_dir: Path) -> str:
    """Read the run id recorded next to a model.

    Raises:
        UserError: the model folder has no run id file.
    """
    path = model_dir / RUN_ID_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{path}: no MLflow run id recorded (was this model written by `mammoseg train`?)") \
            from None


def run_data(run_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """Return (tags, latest metrics) of a run.

    Raises:
        UserError: the server is unreachable or the run does not exist.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    _configure()
    with _server_errors(f"reading run {run_id}"):
        try:
            run = mlflow.MlflowClient().get_run(run_id)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                raise UserError(f"MLflow run {run_id} not found at {_redact(tracking_uri())}") from None
            raise
    return dict(run.data.tags), dict(run.data.metrics)


# --- Model Registry ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """A registered model version: its number, source run and tags."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]


def _version(entity) -> ModelVersion:
    return ModelVersion(entity.name, str(entity.version), entity.run_id or "", dict(entity.tags or {}))


@dataclasses.dataclass(frozen=True)
class PyfuncModel:
    """A model to log in MLflow's `loader_module` form, with float32 tensors in and out.

    Attributes:
        loader_module: the importable module whose `_load_pyfunc(data_path)` opens the model.
        data_path: the file or folder it opens, copied into the logged model byte for byte.
        inputs: tensor name -> shape, -1 for a free dimension (the signature).
        outputs: tensor name -> shape, -1 for a free dimension.
        input_example: tensor name -> array, stored with the model; MLflow serves it once on logging.
        requirements: pip requirement lines (requirements.txt of the logged model).
        metadata: JSON-ready values stored in the MLmodel file, readable through get_model_info.
    """

    loader_module: str
    data_path: Path
    inputs: Mapping[str, tuple[int, ...]]
    outputs: Mapping[str, tuple[int, ...]]
    input_example: Mapping[str, np.ndarray]
    requirements: tuple[str, ...]
    metadata: Mapping[str, Any]


def log_pyfunc_model(run_id: str, model: PyfuncModel, metrics: Mapping[str, float] | None = None) -> str:
    """Log a pyfunc model into a run, its signature a float32 tensor spec.

    Args:
        run_id: the training run.
        model: what to log.
        metrics: the model's evaluation metrics, logged against MLflow 3's logged model (and the run),
            so the UI's model page shows them. MLflow 3.17's log_model links the run's step-0
            metrics by itself; logging them explicitly keeps that true whatever the version.

    Returns:
        The logged model's URI, to register from.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(tensors: Mapping[str, tuple[int, ...]]) -> Schema:
        return Schema([TensorSpec(np.dtype(np.float32), shape, name) for name, shape in tensors.items()])

    signature = ModelSignature(inputs=schema(model.inputs), outputs=schema(model.outputs))
    with continue_run(run_id), _server_errors(f"uploading {model.data_path}"):
        info = mlflow.pyfunc.log_model(name="model", loader_module=model.loader_module,
                                       data_path=str(model.data_path), signature=signature,
                                       input_example=dict(model.input_example),
                                       pip_requirements=list(model.requirements), metadata=dict(model.metadata))
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    return info.model_uri


def find_versions(name: str, run_id: str) -> list[ModelVersion]:
    """Return the versions of a registered model created from a run (empty if none or no model)."""
    import mlflow

    _configure()
    with _server_errors(f"searching versions of {name}"):
        found = mlflow.MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return [_version(v) for v in found]


def create_version(name: str, model_uri: str, run_id: str, tags: Mapping[str, Any]) -> ModelVersion:
    """Register a new version of `name` (created when missing) from a logged model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _configure()
    client = mlflow.MlflowClient()
    with _server_errors(f"registering {name}"):
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise
        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return _version(version)


def _lookup_version(action: str, lookup: Callable[[Any], Any]) -> ModelVersion | None:
    """Run a registry lookup on a client; None when what it looks for does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _configure()
    with _server_errors(action):
        try:
            return _version(lookup(mlflow.MlflowClient()))
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                return None
            raise


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    """Return the version an alias points to, or None when the alias (or the model) does not exist."""
    return _lookup_version(f"reading {name}@{alias}", lambda client: client.get_model_version_by_alias(name, alias))


def model_version(name: str, version: str) -> ModelVersion | None:
    """Return one version of a registered model, or None when it (or the model) does not exist."""
    return _lookup_version(f"reading {name} version {version}", lambda client: client.get_model_version(name, version))


def set_alias(name: str, alias: str, version: str) -> None:
    """Point an alias of a registered model at a version."""
    import mlflow

    _configure()
    with _server_errors(f"setting {name}@{alias}"):
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def set_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a model version."""
    import mlflow

    _configure()
    client = mlflow.MlflowClient()
    with _server_errors(f"tagging {name} version {version}"):
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))


def download_model_artifacts(model_uri: str, destination: Path) -> Path:
    """Download a registered model (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) into a folder.

    Raises:
        UserError: the registry is unreachable or the model, version or alias does not exist.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    _configure()
    with _server_errors(f"downloading {model_uri}"):
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination)))
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower() \
                    or "INVALID_PARAMETER_VALUE" in str(exc):
                raise UserError(f"{model_uri}: no such registered model, version or alias at "
                                f"{_redact(tracking_uri())}") from None
            raise


def set_version_description(name: str, version: str, description: str) -> None:
    """Set a model version's description (markdown, shown on its page in the MLflow UI)."""
    import mlflow

    _configure()
    with _server_errors(f"describing {name} version {version}"):
        mlflow.MlflowClient().update_model_version(name, version, description=description)


def set_model_description(name: str, description: str) -> None:
    """Set a registered model's description (markdown, shown on its page in the MLflow UI)."""
    import mlflow

    _configure()
    with _server_errors(f"describing {name}"):
        mlflow.MlflowClient().update_registered_model(name, description=description)


# The tag MLflow's UI shows (and edits) as a run's description.
RUN_NOTE_TAG = "mlflow.note.content"


def set_run_note(run_id: str, note: str) -> None:
    """Set a run's description (markdown, the `mlflow.note.content` tag the UI shows on the run's page)."""
    import mlflow

    _configure()
    with _server_errors(f"describing run {run_id}"):
        mlflow.MlflowClient().set_tag(run_id, RUN_NOTE_TAG, note)
