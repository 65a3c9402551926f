"""Shared fixtures: a real S3 server on loopback, tiny images, and test-tier markers."""

from __future__ import annotations

import os

import pytest

from tests.s3server import S3Server, apply_env, start_s3_server


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """SeaweedFS on 127.0.0.1 for the whole session; AWS_* env points at it."""
    server = start_s3_server()
    old = apply_env(server)
    yield server
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def ray_session(s3_server: S3Server):
    """One in-process Ray session per module (a logical GPU), started after the S3 server
    so Ray workers inherit its AWS_* environment. Modules opt in with usefixtures."""
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, object_store_memory=300_000_000)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test, named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = name.strip("-") + f"-{os.getpid() % 1000}"
    s3_server.create_bucket(name)
    return name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
