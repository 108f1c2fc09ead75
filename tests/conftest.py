"""Shared test fixtures: hand-written INbreast-format folders (independent of the generator)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MAMMO_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"
CSV_HEADER = "Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads"
PLIST_HEADER = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
    '<plist version="1.0">\n'
)


def write_dicom(path: Path, pixels: np.ndarray, **attributes) -> Path:
    """Write a minimal uncompressed MG DICOM like INbreast's (no patient data, no PixelSpacing)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MAMMO_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientName = ""
    ds.PatientID = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def roi_xml(rois: Sequence[tuple[str, int, Sequence[tuple[float, float]]]]) -> str:
    """Render an OsiriX plist by hand, tab-indented with the 13 ROI keys in INbreast's order."""
    lines = [PLIST_HEADER.rstrip("\n"), "<dict>", "\t<key>Images</key>", "\t<array>", "\t\t<dict>",
             "\t\t\t<key>ImageIndex</key>", "\t\t\t<integer>0</integer>",
             "\t\t\t<key>NumberOfROIs</key>", f"\t\t\t<integer>{len(rois)}</integer>",
             "\t\t\t<key>ROIs</key>", "\t\t\t<array>"]
    t = "\t" * 4
    for index, (name, roi_type, points) in enumerate(rois):
        lines += [f"{t}<dict>",
                  f"{t}\t<key>Area</key>", f"{t}\t<real>0.0</real>",
                  f"{t}\t<key>Center</key>", f"{t}\t<string>(0.000000, 0.000000, 0.000000)</string>",
                  f"{t}\t<key>Dev</key>", f"{t}\t<real>0.0</real>",
                  f"{t}\t<key>IndexInImage</key>", f"{t}\t<integer>{index}</integer>",
                  f"{t}\t<key>Max</key>", f"{t}\t<real>0.0</real>",
                  f"{t}\t<key>Mean</key>", f"{t}\t<real>0.0</real>",
                  f"{t}\t<key>Min</key>", f"{t}\t<real>0.0</real>",
                  f"{t}\t<key>Name</key>", f"{t}\t<string>{name}</string>",
                  f"{t}\t<key>NumberOfPoints</key>", f"{t}\t<integer>{len(points)}</integer>",
                  f"{t}\t<key>Point_mm</key>", f"{t}\t<array>"]
        lines += [f"{t}\t\t<string>(0.000000, 0.000000, 0.000000)</string>" for _ in points]
        lines += [f"{t}\t</array>", f"{t}\t<key>Point_px</key>", f"{t}\t<array>"]
        lines += [f"{t}\t\t<string>({x:f}, {y:f})</string>" for x, y in points]
        lines += [f"{t}\t</array>", f"{t}\t<key>Total</key>", f"{t}\t<real>0.0</real>",
                  f"{t}\t<key>Type</key>", f"{t}\t<integer>{roi_type}</integer>", f"{t}</dict>"]
    lines += ["\t\t\t</array>", "\t\t</dict>", "\t</array>", "</dict>", "</plist>"]
    return "\n".join(lines) + "\n"


def csv_bytes(rows: Sequence[str]) -> bytes:
    """Render INbreast.csv: ASCII, `;`, CRLF line ends, final CRLF."""
    return ("\r\n".join([CSV_HEADER, *rows]) + "\r\n").encode("ascii")


class InbreastFolder:
    """Builds a small INbreast Release 1.0 folder image by image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[str] = []
        (root / "AllDICOMs").mkdir(parents=True)
        (root / "AllXML").mkdir()

    def add(self, image_id: str, patient: str, side: str, view: str, *, birads: str = "2", acr: str = "2",
            date: str = "201001", shape: tuple[int, int] = (64, 48), rois=None, file_view: str | None = None,
            csv_row: bool = True, dicom: bool = True) -> Path:
        """Add one image (DICOM, CSV row, XML when rois is given); return the DICOM path."""
        file_view = file_view or {"MLO": "ML"}.get(view, view)
        path = self.root / "AllDICOMs" / f"{image_id}_{patient}_MG_{side}_{file_view}_ANON.dcm"
        if dicom:
            pixels = np.full(shape, 100, np.uint16)
            pixels[:, : shape[1] // 2] = 1500
            write_dicom(path, pixels)
        if rois is not None:
            (self.root / "AllXML" / f"{image_id}.xml").write_text(roi_xml(rois))
        if csv_row:
            self.rows.append(f"removed;removed;{side};{view};{date};{image_id};{acr};{birads}")
        return path

    def write_csv(self) -> Path:
        """Write INbreast.csv for the rows added so far."""
        path = self.root / "INbreast.csv"
        path.write_bytes(csv_bytes(self.rows))
        return path


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under a folder, keyed by its path relative to the folder.

    A file gives {"": its sha256}; a path that does not exist gives {"": "absent"}, so a vanished
    output never compares equal to a present one. Used wherever a test asserts output unchanged.
    """
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.is_dir():
        return {"": "absent"}
    return {file.relative_to(path).as_posix(): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(path.rglob("*")) if file.is_file()}


@pytest.fixture
def inbreast_folder(tmp_path: Path) -> InbreastFolder:
    """An empty hand-built INbreast folder under tmp_path/inbreast."""
    return InbreastFolder(tmp_path / "inbreast")


def run_git(repo: Path, *argv: str) -> str:
    """Run git in `repo` (with an author, for commits) and return its stripped stdout."""
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *argv], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()


CHECKOUT_DATA_HASH = "0123456789abcdef0123456789abcdef.dir"


@pytest.fixture
def git_checkout(tmp_path: Path) -> Path:
    """A real git checkout, clean: a tracked code.py and a data.dvc naming CHECKOUT_DATA_HASH."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    run_git(repo, "init", "-q")
    (repo / "data.dvc").write_text(f"outs:\n- md5: {CHECKOUT_DATA_HASH}\n  path: inbreast\n")
    (repo / "code.py").write_text("x = 1\n")
    run_git(repo, "add", ".")
    run_git(repo, "commit", "-q", "-m", "one")
    return repo


# --- real servers: moto_server (S3) and the team stack (scripts/stack.sh), started once per test session ---

def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited early: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers (e.g. 401 with basic-auth): it is up
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s: {log_path.read_text()[-2000:]}")


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    env: dict[str, str]


def _start(cmd: list[str], health: str, env: dict[str, str], log_path: Path, timeout: float) -> subprocess.Popen:
    handle = log_path.open("w")
    process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env},
                               start_new_session=True)
    _wait_http(health, process, log_path, timeout)
    return process


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Server:
    """A real S3 endpoint: moto_server on a free 127.0.0.1 port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    process = _start([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                     url, S3_CREDENTIALS, log_path, 300)
    yield Server(url, process, {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": url})
    _stop(process)


AUTH_ADMIN = ("admin", "s3cret-Passw0rd")


@dataclasses.dataclass
class TeamStack:
    """The team stack as `scripts/stack.sh start --auth` runs it, with its settings for the script.

    url and env are what a client needs (the URI and the admin's basic-auth credentials); script()
    runs stack.sh again (stop, start, backup, restore) on the same state folder and ports.
    """

    url: str
    env: dict[str, str]
    state: Path
    script_env: dict[str, str]

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run scripts/stack.sh with args; with check, a failure raises with the script's and server's logs."""
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "stack.sh"), *args], capture_output=True,
                              text=True, env={**os.environ, **self.script_env}, timeout=600, check=False)
        if check and proc.returncode != 0:
            logs = {name: (self.state / name).read_text()[-2000:] for name in ("mlflow.log", "postgres.log")
                    if (self.state / name).is_file()}
            raise RuntimeError(f"scripts/stack.sh {' '.join(args)} exited {proc.returncode}: "
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}{logs}")
        return proc


@pytest.fixture(scope="session")
def team_stack(s3_server) -> TeamStack:
    """The team stack, started once per session by scripts/stack.sh: PostgreSQL for the tracking store and
    basic-auth's user store, `mlflow server --app-name basic-auth`, proxied artifacts in an S3 bucket on
    the session's moto_server (so clients need no S3 credentials).
    """
    # Not under pytest's tmp folder: run as root, the script runs PostgreSQL as `postgres`, which must
    # traverse to its data folder (0711: it can pass through, not list).
    state = Path(tempfile.mkdtemp(prefix="mammoseg-stack-"))
    state.chmod(0o711)
    mlflow_port = free_port()
    script_env = {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_server.url, "MAMMOSEG_STACK_DIR": str(state),
                  "MAMMOSEG_PG_PORT": str(free_port()), "MAMMOSEG_MLFLOW_PORT": str(mlflow_port),
                  "MAMMOSEG_MLFLOW_WORKERS": "2", "MLFLOW_ADMIN_USERNAME": AUTH_ADMIN[0],
                  "MLFLOW_ADMIN_PASSWORD": AUTH_ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}
    url = f"http://127.0.0.1:{mlflow_port}"
    stack = TeamStack(url, {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": AUTH_ADMIN[0],
                            "MLFLOW_TRACKING_PASSWORD": AUTH_ADMIN[1]}, state, script_env)
    try:
        stack.script("start", "--auth")
        yield stack
    finally:
        stack.script("stop", check=False)
        shutil.rmtree(state, ignore_errors=True)


def _point_at(stack: TeamStack, patch: pytest.MonkeyPatch) -> None:
    """Point MLflow clients (and child processes) at the stack as its admin, with no S3 credentials."""
    for key, value in stack.env.items():
        patch.setenv(key, value)
    for key in S3_CREDENTIALS:
        patch.delenv(key, raising=False)


@contextlib.contextmanager
def as_admin_of(stack: TeamStack):
    """_point_at for the block of a session fixture (a test uses tracking_env)."""
    with pytest.MonkeyPatch.context() as patch:
        _point_at(stack, patch)
        yield


@pytest.fixture
def tracking_env(team_stack, monkeypatch) -> TeamStack:
    """Point this test's MLflow client (and child processes) at the session's team stack, as its admin."""
    _point_at(team_stack, monkeypatch)
    return team_stack


# --- a small generated dataset through the real stages, shared by the stage tests -----------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def stage_config_for(stage: str, **overrides):
    """The stage's config from the repository's params.yaml with test overrides."""
    from mammoseg.config import load_params, stage_config

    return stage_config(stage, load_params(REPO_ROOT / "params.yaml"), overrides)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    inbreast: Path
    manifest: Path
    masks: Path
    dataset: Path


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> PreparedData:
    """synth (8 patients, scale 0.1) -> ingest -> preprocess at 128 px: seconds, both lesion classes."""
    from mammoseg import synth
    from mammoseg.stages import ingest, preprocess

    root = tmp_path_factory.mktemp("prepared")
    synth.run(stage_config_for("synth", cases=8, seed=3, scale=0.1), root / "inbreast")
    ingest.run(stage_config_for("ingest", workers=1), root / "inbreast", root / "manifest.parquet", root / "masks")
    preprocess.run(stage_config_for("preprocess", size=128, workers=1), root / "inbreast", root / "manifest.parquet",
                   root / "masks", root / "dataset")
    return PreparedData(root / "inbreast", root / "manifest.parquet", root / "masks", root / "dataset")


TINY_TRAIN = {"epochs": 2, "batch_size": 4, "num_workers": 0, "overlay_every": 1, "overlay_images": 2,
              "log_system_metrics": False, "warmup_epochs": 0, "validate_every": 1}


@pytest.fixture(scope="session")
def trained_model(prepared_data, team_stack, tmp_path_factory) -> Path:
    """A LightUNet trained for 2 epochs on prepared_data, evaluated, tracked on the session's server."""
    from mammoseg.stages import evaluate, train

    root = tmp_path_factory.mktemp("trained")
    with as_admin_of(team_stack):
        train.run(stage_config_for("train", **TINY_TRAIN), prepared_data.dataset, root / "model", root / "train.json")
        evaluate.run(stage_config_for("evaluate", bootstrap_resamples=200), prepared_data.dataset, root / "model",
                     root / "metrics.json", root / "evaluation")
    return root / "model"


# Export overrides for tests that need the fp32 model only: no variants, one timed run at 256 px.
FAST_EXPORT = {"int8": False, "openvino": [], "latency_size": 256, "latency_repeats": 1}


@pytest.fixture(scope="session")
def exported(trained_model, prepared_data, team_stack, tmp_path_factory) -> Path:
    """trained_model exported to ONNX with every variant params.yaml asks for, gated on prepared_data.

    Timed at 256 px (params.yaml: 1536) to keep the session short; the choice among variants reads
    the measured numbers whatever the size.
    """
    from mammoseg.stages import export

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    with as_admin_of(team_stack):
        export.run(stage_config_for("export", latency_size=256, latency_repeats=1), trained_model,
                   prepared_data.dataset, out)
    return out


SERVED_MODEL = "mammoseg-served"


@pytest.fixture(scope="session")
def served_champion(exported, prepared_data, team_stack) -> str:
    """`exported` registered as SERVED_MODEL and pointed at by @champion; returns its version.

    The 2-epoch model fails the gate (it stays @challenger), so the alias is set by hand: serving and
    the audit record concern the registered artifact, not the gate, and a trained model's
    probabilities vary across the image, so a swapped channel or a logit served as a probability shows.
    """
    from mammoseg import tracking
    from mammoseg.stages import register

    with as_admin_of(team_stack):
        version = register.run(stage_config_for("register", name=SERVED_MODEL), exported, prepared_data.dataset).version
        tracking.set_alias(SERVED_MODEL, "champion", version)
    return version


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests where no CUDA device is present (never fake them on the CPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
