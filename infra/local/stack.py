#!/usr/bin/env python3
"""A local development stack without Docker: an MLflow tracking server and an S3 endpoint
(moto's server), both on 127.0.0.1.

    python infra/local/stack.py [--dir .local-stack] [--bucket moe-ray]

prints the environment variables to use (MLflow URI, S3 endpoint, test credentials), then
runs until Ctrl-C / SIGTERM and stops both servers, leaving no process behind. The tests use
the same class (LocalStack).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing served {url} within {timeout_s:.0f} s")


class LocalStack:
    """MLflow (SQLite backend, local artifact store) + moto S3, started and stopped together."""

    def __init__(
        self,
        folder: Path,
        bucket: str = "moe-ray",
        mlflow: bool = True,
        s3: bool = True,
        mlflow_port: int | None = None,
    ):
        self.folder = Path(folder).resolve()
        self.bucket = bucket
        self.want_mlflow, self.want_s3 = mlflow, s3
        self.procs: dict[str, subprocess.Popen] = {}
        self.mlflow_port, self.s3_port = mlflow_port, None

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        out = {}
        if self.mlflow_port:
            out["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        if self.s3_port:
            out.update(
                AWS_ENDPOINT_URL_S3=self.s3_endpoint,
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_REGION="us-east-1",
            )
        return out

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        # A process group of its own, so stop() also ends the server's workers (gunicorn/uvicorn).
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_mlflow(self) -> None:
        self.mlflow_port = self.mlflow_port or free_port()
        proc = self._spawn(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.folder / "mlartifacts"),
                "--workers",
                "1",
            ],
        )
        wait_http(f"{self.mlflow_uri}/health", 90, proc)

    def start_s3(self) -> None:
        self.s3_port = free_port()
        proc = self._spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)])
        wait_http(self.s3_endpoint, 30, proc)
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        if self.bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=self.bucket)

    def start(self) -> LocalStack:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            if self.want_s3:
                self.start_s3()
            if self.want_mlflow:
                self.start_mlflow()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_one(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_one(name)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".local-stack", help="where the servers keep their data and logs")
    parser.add_argument("--bucket", default="moe-ray", help="bucket to create in the S3 endpoint")
    args = parser.parse_args()
    stack = LocalStack(Path(args.dir), args.bucket)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Ctrl-C must stop the servers even when this was started from a background job of a
    # non-interactive shell, which starts its processes with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with stack:
        print("# local stack is up; in another shell:")
        for k, v in stack.env().items():
            print(f"export {k}={v}")
        print(f"# jobs: tracking.uri: {stack.mlflow_uri}   checkpoint.storage: s3://{args.bucket}/runs")
        print("# Ctrl-C stops both servers", flush=True)
        try:
            while all(p.poll() is None for p in stack.procs.values()):
                time.sleep(1)
            print("a server exited; stopping", file=sys.stderr)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
