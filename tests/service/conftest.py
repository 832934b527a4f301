"""Server test fixtures: the checkpoint loaded offline, the real Redis on 127.0.0.1:6379 under a key
prefix of the test's own, and a redis-server of a test's own to stop and start."""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch

from model.checkpoint import Recommender, load_recommender

# The tests run in importlib mode (pyproject), which puts no test directory on sys.path; the test
# modules here import their helpers by this directory's path.
sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import OwnRedis, redis_or_fail  # noqa: E402


@pytest.fixture(scope="session")
def offline(tiny_checkpoint) -> Recommender:
    """The checkpoint loaded in the test process, as offline evaluation loads it."""
    return load_recommender(tiny_checkpoint, "cpu", torch.float32)


@pytest.fixture
def redis_prefix():
    """A key prefix of this test's own in the shared Redis; its keys are deleted afterwards."""
    client = redis_or_fail()
    prefix = f"cllm4rec-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_client():
    client = redis_or_fail()
    yield client
    client.close()


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("the service tests need redis-server on the PATH (README, 'Tests')")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()
