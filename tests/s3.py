"""An S3-compatible server for tests: moto on 127.0.0.1 in this process, with empty buckets.

Other processes (DVC, an `mlflow server`) reach it at its endpoint URL like any S3 store; moto
accepts any credentials, so tests pick fake ones (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

REGION = "us-east-1"  # moto's default; buckets elsewhere need a LocationConstraint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_client(endpoint: str):
    """A boto3 S3 client of the moto server, with its own fake credentials (not the env's)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id="moto", aws_secret_access_key="moto")  # fmt: skip


@contextmanager
def moto_s3(*buckets: str) -> Iterator[str]:
    """Yields the endpoint URL of a moto S3 server holding `buckets`, empty; skips the test
    when moto's server extra is not installed."""
    moto_server = pytest.importorskip(
        "moto.server", reason="moto[server] is not installed (the dev extra): no S3 emulator"
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for bucket in buckets:
            s3_client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def object_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every key under prefix (all pages: list_objects_v2 returns 1000 at most)."""
    paginator = s3_client(endpoint).get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]
