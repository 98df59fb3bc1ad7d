"""Shared fixtures: broker URLs from the environment, isolated key prefixes, process reaping."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.support.env import in_ci
from tests.support.procs import Processes

#: Default Redis for tests; `make test` exports REDIS_URL.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def pytest_configure(config: pytest.Config) -> None:
    """Every Python process the tests start (workers, the CLI, scripts) reads compiled modules
    from one cache outside the tree: with ``PYTHONDONTWRITEBYTECODE`` set (as on the project's
    machines), each of the hundreds of them would compile the package and the test apps again."""
    if not os.environ.get("PYTHONPYCACHEPREFIX"):
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(
            tempfile.gettempdir(), f"celery-partitioning-pycache-{os.getuid()}")
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def _unavailable(what: str, url: str, exc: BaseException) -> None:
    message = f"{what} not reachable at {url}: {exc}"
    if in_ci():
        pytest.fail(message + " (CI=true: a missing broker fails the run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis that answers (skips on a laptop without one; fails in CI)."""
    import redis

    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:
        _unavailable("Redis", url, exc)
    return url


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """A RabbitMQ that answers (skips on a laptop without one; fails in CI)."""
    from kombu import Connection

    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        _unavailable("RabbitMQ", url, exc)
    return url


@pytest.fixture
def store_redis(redis_url: str, namespace: str) -> Iterator[Any]:
    """A client of REDIS_URL's database, where the store tests keep their keys under
    ``namespace`` (which deletes them afterwards); closed after the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store(store_redis: Any, namespace: str) -> Any:
    """The dead-letter store (parking, backoff, skip, pause) on ``store_redis``, under
    ``namespace``; a test module may define its own ``store``."""
    from celery_partitioning.store.deadletters import DeadLetterStore
    from celery_partitioning.store.keys import RedisKeys

    return DeadLetterStore(store_redis, RedisKeys(namespace))


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A unique key prefix for one test; every Redis key containing it is deleted afterwards.

    Tests keep to the one database REDIS_URL names (a developer's Redis is theirs): apps,
    queues, stores and records are told apart by this prefix, never by a database number."""
    import redis

    ns = f"cptest-{uuid.uuid4().hex[:10]}:"
    yield ns
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"*{ns}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def fa(redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """tests/apps/failures_app on REDIS_URL under this test's namespace (workers get the same env)."""
    import importlib

    import redis

    url = redis_url
    monkeypatch.setenv("CP_REDIS_URL", url)
    monkeypatch.setenv("CP_NS", namespace)
    module = importlib.reload(importlib.import_module("tests.apps.failures_app"))
    assert namespace == module.NS
    yield module
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"*{namespace}*", count=1000):
        client.delete(key)


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Start subprocesses through this; all are killed (by process group) after the test."""
    procs = Processes()
    try:
        yield procs
    finally:
        procs.kill_all()


@pytest.fixture(autouse=True)
def _forget_shared_tasks() -> Iterator[None]:
    """``@shared_task`` (and ``@app.task``, shared by default) registers the task on every app
    finalized later in the process; keep one test's tasks out of the next test's apps."""
    from celery import _state

    before = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(before)
