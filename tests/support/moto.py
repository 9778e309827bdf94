"""A real S3 API for tests: moto's server on a loopback port, with one bucket (dummy credentials)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from .net import free_port


@contextlib.contextmanager
def moto_s3_server(tmp: Path, bucket: str, start_timeout: float = 30.0) -> Iterator[tuple[str, Any]]:
    """Start ``python -m moto.server`` on loopback, create ``bucket``; yields ``(endpoint, boto3 client)``.

    Skips the test when moto or boto3 is not installed; fails it when the server does not start.
    """
    pytest.importorskip("moto", reason="moto not installed (pip install moto)")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    log = open(tmp / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001 - server still starting
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto S3 server did not start:\n{(tmp / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield endpoint, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
