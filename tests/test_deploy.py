"""Deployment files: the Ray launcher config, the KubeRay manifests, and infra/local."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import jsonschema
import pytest
import ray
import yaml
from typer.testing import CliRunner

from moe_ray.cli import app

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def test_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] < gpu["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert [p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]] == [22]


def _blocks(tf: dict, kind: str) -> dict[str, dict]:
    """Terraform blocks of one kind by name ("type.name" for resources and data), quotes stripped."""
    out = {}
    for entry in tf.get(kind, []):
        for key, body in entry.items():
            if kind in ("resource", "data"):
                for name, inner in body.items():
                    out[f"{key.strip(chr(34))}.{name.strip(chr(34))}"] = inner
            else:
                out[key.strip('"')] = body
    return out


def test_terraform_parses_and_every_reference_resolves():
    import hcl2

    text = (ROOT / "infra" / "terraform" / "main.tf").read_text()
    tf = hcl2.loads(text)  # a syntax error fails here
    variables, resources, data = _blocks(tf, "variable"), _blocks(tf, "resource"), _blocks(tf, "data")
    assert set(re.findall(r"\bvar\.(\w+)", text)) <= set(variables)
    assert {f"{t}.{n}" for t, n in re.findall(r"\bdata\.(\w+)\.(\w+)", text)} <= set(data)
    assert {f"{t}.{n}" for t, n in re.findall(r"(?<![.\w])(aws_\w+)\.(\w+)\.\w", text)} <= set(resources)
    # The bucket is private and encrypted; interrupted uploads are aborted; expiring runs/ is opt-in.
    block = resources["aws_s3_bucket_public_access_block.moe_ray"]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy", "restrict_public_buckets"))
    assert "aws_s3_bucket_server_side_encryption_configuration.moe_ray" in resources
    lifecycle = resources["aws_s3_bucket_lifecycle_configuration.moe_ray"]
    assert [r["abort_incomplete_multipart_upload"][0]["days_after_initiation"] for r in lifecycle["rule"]] == [1]
    assert variables["checkpoint_days"]["default"] is None
    assert "var.checkpoint_days == null ? []" in lifecycle["dynamic"][0]['"rule"']["for_each"]
    # The instance profile is the one the Ray cluster config names.
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values()}
    assert profiles == {resources["aws_iam_instance_profile.node"]["name"].strip('"')}


def _cluster_specs(doc):
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("path", KUBERAY, ids=[p.stem for p in KUBERAY])
def test_kuberay_manifest_has_required_fields(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"]["name"]
    spec = _cluster_specs(doc)
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    if doc["kind"] == "RayCluster":
        assert spec["enableInTreeAutoscaling"] is True


def test_rayjob_entrypoint_names_real_commands_and_job_files():
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    entrypoints = [
        yaml.safe_load(p.read_text())["spec"]["entrypoint"]
        for p in KUBERAY
        if yaml.safe_load(p.read_text())["kind"] == "RayJob"
    ]
    assert entrypoints
    for entry in entrypoints:
        words = shlex.split(entry)
        assert words[0] == "moe-ray" and words[1] in commands, entry
        job_files = [w for w in words if w.endswith(".yaml")]
        assert job_files and all((ROOT / "jobs" / Path(w).name).is_file() for w in job_files), entry
        # The --set overrides it passes still give a valid job.
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        result = CliRunner().invoke(
            app, ["validate", str(ROOT / "jobs" / Path(job_files[0]).name), *[a for s in sets for a in ("--set", s)]]
        )
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_job_validates_with_the_cli(path):
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["name"] == path.stem


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_local_stack_starts_serves_and_stops_cleanly(tmp_path):
    folder = tmp_path / "stack"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "infra" / "local" / "stack.py"), "--dir", str(folder), "--bucket", "stack-test"],
        stdout=subprocess.PIPE,
        text=True,
    )
    env = {}
    try:
        deadline = time.time() + 120
        while True:
            line = proc.stdout.readline()
            assert line and time.time() < deadline, "the stack did not come up"
            if m := re.match(r"export (\w+)=(\S+)", line):
                env[m[1]] = m[2]
            if line.startswith("# Ctrl-C"):
                break
        # MLflow answers a real API request.
        req = urllib.request.Request(
            f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search",
            data=b'{"max_results": 5}',
            headers={"Content-Type": "application/json"},
        )
        assert "experiments" in json.loads(urllib.request.urlopen(req, timeout=10).read())
        # S3 put/get over HTTP.
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.put_object(Bucket="stack-test", Key="hello", Body=b"world")
        assert s3.get_object(Bucket="stack-test", Key="hello")["Body"].read() == b"world"
        ports = [int(env[k].rsplit(":", 1)[1]) for k in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3")]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0
    time.sleep(1)
    assert not any(_port_open(p) for p in ports)
    leftover = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split()
    assert [pid for pid in leftover if int(pid) != os.getpid()] == []
