"""What idle partitions cost: one lease renewal call per process, and a stop that does not wait
for a blocked fetch (``benchmarks/bench_idle.py`` measures the rest)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis

from celery_partitioning.store.broker import FETCH_TIMEOUT
from celery_partitioning.store.lease import Lease, LeaseRenewer
from celery_partitioning.worker.inprocess import InProcessWorker
from tests.apps.lifecycle_app import make_app
from tests.support.procs import wait_for

pytestmark = pytest.mark.integration


def _renewals(url: str, keys: list[str], count: int, timeout: float) -> list[str]:
    """The first ``count`` EVALSHA commands (MONITOR) naming any of ``keys``."""
    seen: list[str] = []
    client = redis.Redis.from_url(url, socket_timeout=timeout)
    deadline = time.monotonic() + timeout
    with client.monitor() as monitor:
        while len(seen) < count and time.monotonic() < deadline:
            command = str(monitor.next_command()["command"])
            if command.upper().startswith("EVALSHA") and any(key in command for key in keys):
                seen.append(command)
    client.close()
    return seen


def _counter(counts: list[int]) -> Callable[[], None]:
    return lambda: counts.append(1)


def test_one_call_renews_every_lease_of_a_process_and_a_lost_one_fences_alone(
        redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = [f"{namespace}lease-{i}" for i in range(3)]
    renewer = LeaseRenewer(client, 1.5)
    reasons: dict[str, list[str]] = {key: [] for key in keys}
    beats: dict[str, list[int]] = {key: [] for key in keys}
    leases = [Lease(client, key, 1.5, token=f"t{i}", fence=reasons[key].append, renewer=renewer)
              for i, key in enumerate(keys)]
    try:
        # Given three leases of one process, renewed by its renewer
        for lease in leases:
            assert lease.try_acquire()
            lease.on_beat.append(_counter(beats[lease.key]))
            lease.start_heartbeat()
        # Then every renewal call names all three: one call per beat, not one per lease
        calls = _renewals(redis_url, keys, 2, 10)
        assert len(calls) == 2 and all(all(key in call for key in keys) for call in calls)
        wait_for(lambda: all(beats[key] for key in keys), 5, "a renewal of each lease")
        # When one of them is taken by another holder
        client.set(keys[1], "other|host|1|n", px=10_000)
        # Then that one fences itself, and the others go on being renewed
        wait_for(lambda: bool(reasons[keys[1]]), 5, "the fence of the lost lease")
        assert "lost the lease" in reasons[keys[1]][0]
        counted = {key: len(beats[key]) for key in (keys[0], keys[2])}
        wait_for(lambda: all(len(beats[k]) > n for k, n in counted.items()), 5,
                 "the other leases renewed after the fence")
        assert not reasons[keys[0]] and not reasons[keys[2]]
    finally:
        for lease in leases:
            lease.release()
        client.delete(*keys)
    # The last lease released, the renewer's thread has ended
    assert not [t for t in threading.enumerate() if t.name == "partition-lease"]


def test_a_stop_does_not_wait_for_the_blocked_fetch_of_an_idle_partition(
        redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    app = make_app(redis_url, namespace)
    with InProcessWorker(app, "entity") as worker:
        unit = worker.partition("entity", 0)
        assert unit.consuming and unit.thread is not None
        name = unit.thread.fetch_name
        # Given an idle partition whose fetch is blocked on the server
        wait_for(lambda: any(entry.get("name") == name and entry.get("cmd") == "blmove"
                             for entry in client.client_list(_type="normal")),
                 10, "the partition's blocked fetch")
        # When it is stopped
        started = time.monotonic()
        assert unit.stop(timeout=FETCH_TIMEOUT + 5)
        took = time.monotonic() - started
        # Then its fetch was unblocked: the stop did not wait out the fetch time-out
        assert took < FETCH_TIMEOUT / 2, f"the stop took {took:.2f}s"
