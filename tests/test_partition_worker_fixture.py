"""The ``partition_worker`` fixture through the installed plugin, in fresh pytest processes:
every test starts with clean partition state, and a Django project whose test database is
in-memory SQLite is refused before any task can be dead-lettered."""

from __future__ import annotations

import pytest
import redis

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

#: A user's test file whose test parks a key: its poison message becomes a dead letter.
PARKS_A_KEY = '''
import os
import time

import pytest
import redis
from celery import Celery

import celery_partitioning
from celery_partitioning import create_entity_partition_key, partitioned

REDIS_URL, NS = os.environ["REDIS_URL"], os.environ["CP_TEST_NS"]
app = Celery("parks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.broker_transport_options = {"global_keyprefix": NS}
app.conf.result_backend_transport_options = {"global_keyprefix": NS}
app.conf.partitioning_pools = {"entity": 2}
app.conf.partitioning_redis_url = REDIS_URL
app.conf.partitioning_queue_prefix = "parks"
celery_partitioning.install(app)


@app.task(shared=False)
@partitioned(create_entity_partition_key("Order"), pool="entity")
def step(order_id, n):
    if n == 0:
        raise ValueError("poison")
    return n


@pytest.fixture
def partition_worker_app():
    return app


def test_a_poison_message_parks_its_key(partition_worker):
    # the first message of o1 runs (and fails): its key was not parked when the test began
    with pytest.raises(ValueError, match="poison"):
        step.delay("o1", 0).get(timeout=20)
    later = step.delay("o1", 1)
    assert step.delay("o2", 1).get(timeout=20) == 1
    client = redis.Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + 20
    while not client.keys(NS + "cp:parked:entity:*"):
        assert time.monotonic() < deadline, "o1's second message was not parked"
        time.sleep(0.05)
    assert later.state == "PENDING"
'''


def test_a_test_that_parks_a_key_passes_when_run_twice_in_a_row(
        pytester: pytest.Pytester, redis_url: str, namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CP_TEST_NS", namespace)
    pytester.makepyfile(test_parks=PARKS_A_KEY)
    client = redis.Redis.from_url(redis_url)
    # When pytest runs the file twice, each time in a new process
    for run in (1, 2):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
        # Then each run passes: the second finds no dead letter or parked message of the first
        assert result.ret == 0, f"run {run}:\n" + "\n".join(result.outlines[-40:])
        result.assert_outcomes(passed=1)
        assert client.keys(f"{namespace}cp:dl:*") == []
        assert client.keys(f"{namespace}cp:parked*") == []
        assert client.keys(f"{namespace}cp:attempts:*") == []


IN_MEMORY_DJANGO = '''
import os

import django
import pytest
from celery import Celery
from django.conf import settings

import celery_partitioning

settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                          "NAME": ":memory:"}})
django.setup()

REDIS_URL = os.environ["REDIS_URL"]
app = Celery("memory_db", broker=REDIS_URL)
app.conf.broker_transport_options = {"global_keyprefix": os.environ["CP_TEST_NS"]}
app.conf.partitioning_pools = {"entity": 2}
celery_partitioning.install(app)


@pytest.fixture
def partition_worker_app():
    return app


def test_uses_the_worker(partition_worker):
    raise AssertionError("the fixture should have refused to start")
'''


def test_an_in_memory_sqlite_django_database_is_refused_with_what_to_do(
        pytester: pytest.Pytester, redis_url: str, namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("django")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CP_TEST_NS", namespace)
    pytester.makepyfile(test_memory=IN_MEMORY_DJANGO)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    # Then the test errors in the fixture's set-up, saying why and what works instead
    result.assert_outcomes(errors=1)
    text = "\n".join(result.outlines)
    assert "database(s) 'default': in-memory SQLite" in text
    assert "'OPTIONS': {'timeout': 20}" in text and "transaction=True" in text
    assert "PostgreSQL" in text
