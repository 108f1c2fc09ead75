"""scripts/stack.sh: the team stack on PostgreSQL, its backup and its restore after a loss."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import urllib.request
import uuid

import boto3
import mlflow
import pytest
from mlflow.server import get_app_client

from tests.conftest import REPO_ROOT, S3_CREDENTIALS

STACK = REPO_ROOT / "scripts" / "stack.sh"


def _status_as(url: str, username: str, password: str) -> int:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_stores_are_postgresql(team_stack):
    config = (team_stack.state / "basic_auth.ini").read_text()
    assert "database_uri = postgresql+psycopg://mlflow@127.0.0.1:" in config  # no password in the URI
    assert oct((team_stack.state / "basic_auth.ini").stat().st_mode)[-3:] == "600"
    assert "PostgreSQL" in (team_stack.state / "postgres.log").read_text()
    # The tracking store: the server's runs table lives in PostgreSQL's `mlflow` database.
    tables = subprocess.run(["psql", "-h", "127.0.0.1", "-p", team_stack.script_env["MAMMOSEG_PG_PORT"], "-U", "mlflow",
                             "-d", "mlflow", "-tAc", "SELECT count(*) FROM information_schema.tables "
                             "WHERE table_name IN ('runs', 'registered_models')"],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "PGPASSFILE": str(team_stack.state / "pgpass")})
    assert tables.stdout.strip() == "2"


@pytest.mark.slow
def test_backup_then_a_lost_stack_restored_has_the_registry_and_users_again(team_stack, tracking_env, s3_server,
                                                                            tmp_path):
    name = f"backup-{uuid.uuid4().hex[:8]}"
    user = (f"user-{uuid.uuid4().hex[:6]}", "An0ther-Passw0rd")
    get_app_client("basic-auth", tracking_uri=team_stack.url).create_user(*user)
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/weights.txt")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    team_stack.script("backup", str(tmp_path / "backup"))

    # The loss: the database server and its data folder, and every object in the artifact bucket.
    team_stack.script("stop")
    shutil.rmtree(team_stack.state / "postgres")
    s3 = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1",
                      **{k.lower(): v for k, v in S3_CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"})
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow"):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket="mlflow", Key=item["Key"])
    team_stack.script("start", "--auth")
    assert client.search_registered_models(f"name = '{name}'") == []  # a fresh, empty stack
    assert _status_as(team_stack.url, *user) == 401

    team_stack.script("restore", str(tmp_path / "backup"))
    restored = client.get_model_version(name, version)
    assert restored.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    download = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "weights.txt").read_text() == "weights", download
    assert _status_as(team_stack.url, *user) == 200  # the user store came back too


def _script(*args: str, state) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "MAMMOSEG_STACK_DIR": str(state)})


def test_backup_and_restore_refuse_a_wrong_folder_in_one_line(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    for args, message in [(("restore", str(tmp_path / "used")), f"{tmp_path}/used/mlflow.dump: no such file"),
                          (("backup", str(tmp_path / "used")), f"{tmp_path}/used: not empty"),
                          (("backup",), "usage: scripts/stack.sh backup DIR")]:
        proc = _script(*args, state=tmp_path / "state")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"scripts/stack.sh: {message}"), proc.stderr
