"""Shared fixtures: a real S3 server on loopback, one Ray session and one tiny checkpoint for
the whole run (each costs seconds to start or build), and test-tier markers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
    """An in-process Ray session (a logical GPU) shared by the modules that opt in with
    usefixtures: the first starts it, later ones reuse it (a module that needs its own Ray
    shuts it down first). Started after the S3 server so workers inherit its AWS_* env."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, object_store_memory=300_000_000)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return


@pytest.fixture(scope="module", autouse=True)
def _ray_only_where_asked(request: pytest.FixtureRequest) -> None:
    """Stop the shared Ray session before a module that does not ask for it."""
    ray = sys.modules.get("ray")
    items = [i for i in request.session.items if i.module is request.module]
    asked = any("ray_session" in i.fixturenames for i in items)
    if ray is not None and ray.is_initialized() and not asked:
        ray.shutdown()


def pytest_sessionfinish(session: pytest.Session) -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight LLaVA checkpoint (default sizes), built once; treat as read-only."""
    from resprune.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint("llava", tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test, named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = name.strip("-") + f"-{os.getpid() % 1000}"
    s3_server.create_bucket(name)
    return name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules sharing the Ray session last and together (stable otherwise), so the
    session starts once, not once per such module; skip `gpu` tests without CUDA."""
    import torch

    shared = {i.module for i in items if "ray_session" in i.fixturenames}
    items.sort(key=lambda item: getattr(item, "module", None) in shared)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
