"""Submits a compiled pipeline (IR YAML) to a Kubeflow Pipelines endpoint: one run or a recurring run.

Reads the IR YAML; talks to the KFP API server through kfp.Client (authentication as kfp.Client
finds it: in-cluster service-account token, KF_PIPELINES_SA_TOKEN_PATH, or an existing cookie
session). Writes nothing locally.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import kfp
import kfp_server_api
import urllib3


class SubmitError(RuntimeError):
    """The KFP endpoint is unreachable or refused the request (one line)."""


@dataclasses.dataclass(frozen=True)
class Submitted:
    """What the KFP endpoint created: a run or a recurring run, by id."""

    kind: str  # "run" or "recurring run"
    id: str
    experiment: str


def submit(package: Path, host: str, experiment: str, arguments: Mapping[str, str], run_name: str,
           namespace: str | None = None, schedule: str | None = None, max_concurrency: int = 1,
           enable_caching: bool | None = None, client: kfp.Client | None = None) -> Submitted:
    """Create a run (or, with `schedule`, a recurring run) of the compiled pipeline.

    Args:
        package: the compiled IR YAML.
        host: the KFP API endpoint (e.g. https://kubeflow.example.org/pipeline).
        experiment: the experiment to create the run in (created when missing).
        arguments: pipeline parameter values that replace the package's defaults.
        run_name: the run's (or recurring run's) display name.
        namespace: the Kubeflow profile namespace (multi-user deployments).
        schedule: a cron expression with seconds (6 fields, e.g. "0 0 3 * * 1" for Mondays 03:00);
            None submits one run.
        max_concurrency: recurring runs of this schedule allowed at once.
        enable_caching: override the compiled caching settings; None keeps them.
        client: an existing kfp.Client (tests); default one for `host`.

    Returns:
        The kind and id of what was created, and the experiment's id.
    """
    try:
        return _submit(client or kfp.Client(host=host, namespace=namespace), package, experiment, arguments,
                       run_name, namespace, schedule, max_concurrency, enable_caching)
    except urllib3.exceptions.HTTPError as exc:
        raise SubmitError(f"KFP endpoint {host} unreachable ({type(exc).__name__}: {str(exc)[:200]})") from None
    except kfp_server_api.exceptions.ApiException as exc:
        raise SubmitError(f"KFP endpoint {host} refused the request: HTTP {exc.status} {exc.reason}") from None


def _submit(client: kfp.Client, package: Path, experiment: str, arguments: Mapping[str, str], run_name: str,
            namespace: str | None, schedule: str | None, max_concurrency: int,
            enable_caching: bool | None) -> Submitted:
    exp = client.create_experiment(name=experiment, namespace=namespace)
    if schedule:
        recurring = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=run_name, cron_expression=schedule,
            max_concurrency=max_concurrency, no_catchup=True, params=dict(arguments),
            pipeline_package_path=str(package), enable_caching=enable_caching)
        return Submitted("recurring run", recurring.recurring_run_id, exp.experiment_id)
    run = client.create_run_from_pipeline_package(
        str(package), arguments=dict(arguments), run_name=run_name, experiment_id=exp.experiment_id,
        namespace=namespace, enable_caching=enable_caching)
    return Submitted("run", run.run_id, exp.experiment_id)
