"""Submitting jobs to a Ray cluster through Ray's Job Submission API, and following them.

The entrypoint runs `moe-ray run` on the cluster with the resolved job file; this package is
shipped along (`py_modules`), so the cluster runs the client's moe-ray code. With Ray's token
authentication on, the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token and is sent as the
Ray client sends it; it is never printed or logged.
"""

from __future__ import annotations

import logging
import os
import shlex
import tempfile
import uuid
from pathlib import Path

from moe_ray.runtime.cluster import enable_token_auth
from moe_ray.secrets import redact
from moe_ray.spec import JobSpec, check_run_name, default_run_name, dump_job_for_cluster, local_relative
from moe_ray.storage import s3
from moe_ray.storage.catalog import run_name_problem
from moe_ray.storage.location import Location
from moe_ray.system import package_folder

# Non-secret settings the cluster needs to reach S3-compatible storage and MLflow. Credentials
# are NOT forwarded: the cluster's nodes must have their own (instance role, secret, env).
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


class SubmitError(Exception):
    """A submission that cannot go ahead; the message says why."""


def client(address: str):
    """A JobSubmissionClient for `address` (http://HEAD:8265), with token auth when a token exists."""
    from ray.job_submission import JobSubmissionClient

    enable_token_auth()
    # Ray logs each package a submission uploads at INFO, with its temporary folder's name.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address)
    except Exception as err:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(err)}") from None


def job_info(jobs, address: str, submission_id: str):
    """The submitted job's details from the Jobs client `jobs`; SubmitError when there is no such job."""
    try:
        return jobs.get_job_info(submission_id)
    except Exception as err:
        raise SubmitError(
            f"no job {submission_id} at {address} (`moe-ray list --address {address}` lists them): {_first_line(err)}"
        ) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def run_entrypoint(run_name: str, resume: bool = False) -> str:
    """The cluster's command line of a submitted run, every argument quoted."""
    args = ["python", "-m", "moe_ray.cli", "run", "job.yaml", "--address", "auto"]
    return shlex.join(args + (["--resume"] if resume else []) + ["--run", run_name])


def control_entrypoint(command: str, run_name: str, *args: str) -> str:
    """`moe-ray scale|rebalance RUN ...` run inside the cluster, against its Ray."""
    return shlex.join(["python", "-m", "moe_ray.cli", command, run_name, *args, "--address", "auto"])


def cluster_problems(job: JobSpec) -> list[str]:
    """What in `job` cannot work on a cluster: a relative path would name a place inside the
    job's temporary working directory there (the runs, and the MLflow store, deleted with it; the
    data not found), and each node would have its own."""
    fix = "give an s3:// URI, or an absolute path that every node of the cluster mounts"
    problems = []

    for dotted, value, keep in (
        ("checkpoint.storage", job.checkpoint.storage, None),
        ("data.source", job.data.source, "builtin"),
        ("data.tokenizer", job.data.tokenizer, "bytes"),
        ("model.init_from", job.model.init_from, None),
    ):
        if value != keep and local_relative(value):
            problems.append(
                f"{dotted} {value!r} is a relative path: on the cluster it is inside the job's temporary "
                f"working directory; {fix}"
            )
    uri = job.tracking.uri
    if job.tracking.enabled and uri and uri.startswith("sqlite:///") and local_relative(uri[len("sqlite:///") :]):
        problems.append(
            f"tracking.uri {uri} is a relative SQLite file: on the cluster it is inside the job's temporary "
            "working directory, lost with it; set tracking.uri=http://MLFLOW:5000 (an address the cluster reaches)"
        )
    return problems


def tracking_warning(job: JobSpec) -> str | None:
    """A job with tracking on and no tracking.uri logs where the cluster's MLFLOW_TRACKING_URI
    says, which this machine cannot see; without one, its MLflow store is lost with the job."""
    if not job.tracking.enabled or job.tracking.uri:
        return None
    return (
        "warning: no tracking.uri: the run logs to the cluster's MLFLOW_TRACKING_URI if its nodes set one "
        "(cluster/ does), else to an SQLite file in the job's temporary working directory, lost with it; "
        "set tracking.uri=http://MLFLOW:5000 to be sure"
    )


def submit(job: JobSpec, address: str, run_name: str | None = None, resume: bool = False) -> dict:
    """Submit `job` (with `resume`, to continue the run `run_name` from its checkpoints); returns
    {"submission_id", "run_name", "mlflow_run_id", "mlflow_link"}."""
    if run_name:
        _check_named_run(job, check_run_name(run_name), resume)
    else:
        run_name = default_run_name(job)
    submission_id = f"moe-ray-{run_name}-{uuid.uuid4().hex[:6]}"
    mlflow_run_id, link = _precreate_mlflow_run(job, run_name, submission_id)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Unbuffered: `moe-ray logs --follow` shows each line when it is printed, not per 8 KB block.
    env.update(MOE_RAY_SUBMISSION_ID=submission_id, RAY_TRAIN_ENABLE_PRINT_PATCH="0", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="moe-ray-submit-") as tmp:
        (Path(tmp) / "job.yaml").write_text(dump_job_for_cluster(job))
        jobs = client(address)
        try:
            jobs.submit_job(
                entrypoint=run_entrypoint(run_name, resume),
                submission_id=submission_id,
                runtime_env={
                    "working_dir": tmp,
                    "py_modules": [package_folder()],
                    "env_vars": env,
                },
                metadata={
                    "moe_ray.job": job.name,
                    "moe_ray.run": run_name,
                    "mlflow_run_id": mlflow_run_id or "",
                    "mlflow_uri": redact(job.tracking.uri or ""),
                },
            )
        except Exception as err:
            raise SubmitError(f"the cluster at {address} refused the job: {_first_line(err)}") from None
    return {"submission_id": submission_id, "run_name": run_name, "mlflow_run_id": mlflow_run_id, "mlflow_link": link}


def _check_named_run(job: JobSpec, run_name: str, resume: bool) -> None:
    """Refuse here what the driver on the cluster would refuse (a new run under a name that holds
    checkpoints, a resume of one that holds none) when this machine sees the same storage: S3,
    with credentials. A folder here is not the cluster's, and S3 these credentials cannot read
    may be readable there; those the driver checks."""
    if not Location(job.checkpoint.storage).is_s3 or not s3.has_credentials():
        return
    try:
        problem = run_name_problem(job.checkpoint.storage, run_name, resume)
    except s3.StorageError:
        return
    if problem:
        raise SubmitError(problem)


def _precreate_mlflow_run(job: JobSpec, run_name: str, submission_id: str) -> tuple[str | None, str | None]:
    """With a tracking server, create the MLflow run now so its link can be printed; the driver
    on the cluster finds it by its `moe_ray.run` tag and writes into it."""
    uri = job.tracking.uri
    if not job.tracking.enabled or not uri or not uri.startswith(("http://", "https://")):
        return None, None
    from moe_ray.tracking import mlflow_run_of, quiet_mlflow

    quiet_mlflow()
    try:
        from mlflow.tracking import MlflowClient

        c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(job.tracking.experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(job.tracking.experiment)
        # A resumed run goes on in its MLflow run.
        run = mlflow_run_of(c, exp_id, run_name) or c.create_run(
            exp_id,
            run_name=run_name,
            tags={"moe_ray.run": run_name, "moe_ray.job": job.name, "ray.submission_id": submission_id},
        )
        return run.info.run_id, f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run.info.run_id}"
    except Exception:
        return None, None  # tracking never blocks a submission; the driver creates the run later


def control_submitted(address: str, submission_id: str, command: str, *args: str) -> str:
    """Send `moe-ray scale` or `rebalance` to the coordinator of a submitted job, from a small
    job in its cluster (the coordinator is reachable only from inside). Returns that job's id."""
    jobs = client(address)
    info = job_info(jobs, address, submission_id)
    run_name = (info.metadata or {}).get("moe_ray.run")
    if not run_name:
        raise SubmitError(f"{submission_id} is not a moe-ray job")
    check_run_name(run_name, "the job's moe_ray.run metadata")
    if info.status.is_terminal():
        raise SubmitError(f"{submission_id} has ended ({info.status.value}); nothing to {command}")
    helper = jobs.submit_job(
        entrypoint=control_entrypoint(command, run_name, *args),
        runtime_env={"py_modules": [package_folder()]},
        metadata={f"moe_ray.{command}_of": submission_id},
    )
    return helper


def moe_jobs(address: str) -> list:
    """The cluster's moe-ray jobs (those submitted by `moe-ray submit`), oldest first."""
    jobs = [j for j in client(address).list_jobs() if (j.metadata or {}).get("moe_ray.run")]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_outcome(message: str | None) -> tuple[str | None, str | None]:
    """Ray's message about a job in one line, and moe-ray's own `error: ...` line, when the
    message carries the tail of a failed job's log (up to 20,000 characters of it)."""
    if not message:
        return None, None
    head, logs_follow, tail = message.partition(", last available logs")
    errors = [line for line in tail.splitlines() if line.startswith("error: ")] if logs_follow else []
    return head.splitlines()[0] if head.strip() else None, (errors[-1] if errors else None)
