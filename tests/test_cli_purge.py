"""`celery partitioning purge`, run as the real program on Redis and RabbitMQ: what it deletes,
what it keeps, its confirmation and its refusal while a partition is consumed."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from celery_partitioning import partition_for
from celery_partitioning.store.keys import RedisKeys
from tests.apps.harness import Harness, delete_amqp_queues, keyed_events
from tests.support.procs import ROOT, Processes, celery_bin

pytestmark = pytest.mark.integration


def _celery(h: Harness, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``celery -A tests.apps.ordering_app ARGS`` with ``stdin`` as the terminal's answers."""
    return subprocess.run([celery_bin(), "-A", "tests.apps.ordering_app", *args],
                          env={**os.environ, "PYTHONPATH": str(ROOT), **h.env()}, cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=60)


def _depths(h: Harness) -> dict[int, int]:
    result = h.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return {r["index"]: r["depth"] for r in json.loads(result.stdout)["partitions"]}


def _backlog(h: Harness) -> dict[int, int]:
    events, _counts = keyed_events(24, 90, ms=1)
    h.publish(events)
    found = Counter(partition_for(key, h.partitions) for key, _s, _m, _g in events)
    return {i: found.get(i, 0) for i in range(h.partitions)}


def test_purge_on_redis_asks_deletes_the_selection_and_keeps_the_rest(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    # Given a backlog on 4 partitions and one plain message on the default queue
    url = redis_url
    h = Harness(url, url, namespace, 4, tmp_path, Processes())
    backlog = _backlog(h)
    assert all(backlog.values())
    h.app().send_task("plain.elsewhere", ("x",))
    default_queue = f"{namespace}celery"
    assert h.redis.llen(default_queue) == 1

    # When the operator answers "no", nothing is deleted
    declined = _celery(h, "partitioning", "purge", "--partitions", "0-1", stdin="n\n")
    assert declined.returncode == 1
    assert f"Delete the {backlog[0] + backlog[1]} message(s) waiting in 2 partition queue(s)" in declined.stderr
    assert _depths(h) == backlog

    # When they answer "yes", exactly the selected partitions are emptied, each reported
    done = _celery(h, "partitioning", "purge", "--partitions", "0-1", stdin="y\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [f"{namespace}partition.p.0: deleted {backlog[0]} message(s)",
                     f"{namespace}partition.p.1: deleted {backlog[1]} message(s)",
                     f"deleted {backlog[0] + backlog[1]} message(s) from 2 partition queue(s)"]
    assert _depths(h) == {0: 0, 1: 0, 2: backlog[2], 3: backlog[3]}
    assert h.redis.llen(default_queue) == 1  # not a partition queue: untouched

    # And plain `celery purge` empties the default queue but no partition queue
    plain = _celery(h, "purge", "-f")
    assert plain.returncode == 0, plain.stderr
    assert h.redis.llen(default_queue) == 0
    assert _depths(h) == {0: 0, 1: 0, 2: backlog[2], 3: backlog[3]}


def test_purge_on_redis_refuses_a_partition_whose_lease_is_held(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    # Given a backlog, and a live worker holding partition 2's lease
    url = redis_url
    h = Harness(url, url, namespace, 4, tmp_path, Processes())
    backlog = _backlog(h)
    lease = RedisKeys(namespace).lease(f"{namespace}partition.p.2")
    h.redis.set(lease, "tok|host-a|4242|p.2@host-a", px=60_000)

    # When purge -f runs, it refuses and deletes nothing, naming the holder
    refused = h.cli("purge", "-f")
    assert refused.returncode == 1
    assert f"{namespace}partition.p.2: consumed by p.2@host-a (pid 4242)" in refused.stderr
    assert "pass --while-running" in refused.stderr and "nothing was deleted" in refused.stderr
    assert _depths(h) == backlog

    # Unless told to purge under the running worker; a pool selection it does not touch is fine
    other = h.cli("purge", "-f", "--partitions", "3")
    assert other.returncode == 0, other.stderr
    forced = h.cli("purge", "-f", "--while-running")
    assert forced.returncode == 0, forced.stderr
    assert f"{namespace}partition.p.2: deleted {backlog[2]} message(s) (while consumed by " \
           "p.2@host-a (pid 4242))" in forced.stdout
    assert _depths(h) == {0: 0, 1: 0, 2: 0, 3: 0}
    assert h.redis.get(lease) is not None  # the lease is the worker's business, not purge's


@pytest.mark.rabbitmq
def test_purge_on_rabbitmq_empties_partition_queues_and_refuses_a_consumed_one(
        amqp_url: str, redis_url: str, namespace: str, tmp_path: Path) -> None:
    from kombu import Connection

    h = Harness(amqp_url, redis_url, namespace, 3, tmp_path, Processes())
    queues = [f"{namespace}partition.p.{i}" for i in range(3)]
    try:
        backlog = _backlog(h)
        # Given a consumer attached to partition 1
        with Connection(amqp_url) as conn:
            channel = conn.channel()
            channel.basic_consume(queue=queues[1], callback=lambda _m: None, no_ack=False)
            refused = h.cli("purge", "-f")
            assert refused.returncode == 1
            assert f"{queues[1]}: consumed by 1 consumer(s)" in refused.stderr
            assert _depths(h)[0] == backlog[0]
            channel.close()

        # When no one consumes, purge -f empties every partition queue
        done = h.cli("purge", "-f")
        assert done.returncode == 0, done.stderr
        total = sum(backlog.values())
        assert f"deleted {total} message(s) from 3 partition queue(s)" in done.stdout
        assert _depths(h) == {0: 0, 1: 0, 2: 0}
        assert ":guest@" not in done.stdout + done.stderr
    finally:
        delete_amqp_queues(amqp_url, queues)
