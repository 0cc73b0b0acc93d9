"""A real S3 endpoint on loopback (moto_server) for the demo and the tests.

It speaks the S3 HTTP API, so s3fs, pyarrow and boto3 talk to it exactly as to AWS; only the
standard AWS environment variables point them here. Nothing in the jobs knows it exists.

    with LocalS3() as s3:          # starts moto_server on a free 127.0.0.1 port
        s3.make_bucket("ledgers")
        os.environ.update(s3.env)  # AWS_ENDPOINT_URL, dummy keys, region
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_executable() -> str:
    """The moto_server installed beside this Python (the venv's: the one pyproject's `local` extra installs);
    one on PATH only where there is none (a moto installed globally, say). Not the resolved
    interpreter's folder: a venv's python is a link to the system's."""
    beside = Path(sys.executable).with_name("moto_server")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("moto_server")
    if found:
        return found
    raise RuntimeError(f"no moto_server beside {sys.executable} nor on PATH: install it with "
                       f"`{sys.executable} -m pip install 'moto[server]'`")


class LocalS3:
    def __init__(self, port: int | None = None, log_path: str | Path | None = None,
                 access_key_id: str = "local-test-key", secret_access_key: str = "local-test-secret"):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Dummy keys: moto accepts any; real keys must never be needed (or leak) here. Tests pass
        # realistic-looking fake ones, to prove that no output or log ever holds them.
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout_s: float = 30.0) -> "LocalS3":
        exe = moto_server_executable()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # Binds to loopback only: nothing outside this machine can reach it.
        self.process = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=out,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {self.process.returncode} (port {self.port})")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def filesystem(self):
        """An s3fs filesystem bound to this endpoint (independent of the process environment)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"], secret=self.env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.endpoint, skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set env vars; return the previous values so they can be restored."""
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
