"""Guarantees a partition worker keeps whatever the timing: fetch, recovery, fencing, bad input.

Each test fails deterministically if its mechanism is switched off: a worker that fetches with
kombu's BRPOP, a recovery that ignores the in-transit list, a lease that does not fence a
frozen or cut-off holder, a consumer that drops malformed messages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from celery_partitioning.store.keys import RedisKeys
from celery_partitioning.store.lease import Lease
from tests.apps.harness import Harness, keyed_events
from tests.support.ordering import check
from tests.support.procs import Processes, wait_for

# -- the lease fences its holder -----------------------------------------------------------

@pytest.fixture
def lease_key(redis_url: str, namespace: str) -> tuple[redis.Redis, str]:
    return redis.Redis.from_url(redis_url), f"{namespace}lease-test"


@pytest.fixture
def lease_clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The lease module's monotonic clock, ahead of the real one by ``["s"]`` seconds (a
    process frozen that long: a stopped VM, a GC pause)."""
    from celery_partitioning.store import lease as lease_module

    offset = {"s": 0.0}
    fake_time = SimpleNamespace(monotonic=lambda: time.monotonic() + offset["s"], sleep=time.sleep)
    monkeypatch.setattr(lease_module, "time", fake_time)
    return offset


@pytest.mark.integration
def test_a_holder_frozen_longer_than_the_ttl_fences_itself_even_though_renewal_succeeds(
        lease_key: tuple[redis.Redis, str], lease_clock: dict[str, float]) -> None:
    client, key = lease_key
    # Given a holder whose clock we control: after it took the lease, it "freezes" for twice
    # the TTL (a stopped VM, a GC pause), while its lease key stays alive in Redis
    offset = lease_clock
    reasons: list[str] = []
    lease = Lease(client, key, 3.0, token="frozen", fence=reasons.append)
    assert lease.try_acquire()
    offset["s"] = 6.0
    # When its heartbeat runs again, and renewing the lease works
    lease.start_heartbeat()
    wait_for(lambda: bool(reasons), 10, "the fence")
    # Then it fences itself all the same: another worker may have run in between
    assert "frozen" in reasons[0]
    assert client.pttl(key) > 0  # the renewal itself had succeeded
    lease.release()


@pytest.mark.integration
def test_a_holder_that_cannot_reach_redis_fences_itself(lease_key: tuple[redis.Redis, str]) -> None:
    from redis.connection import ConnectionPool

    client, key = lease_key
    # Given a holder with the lease and a heartbeat
    lease_client = redis.Redis(connection_pool=ConnectionPool(
        **{**client.connection_pool.connection_kwargs, "socket_timeout": 0.3,
           "socket_connect_timeout": 0.3}))
    reasons: list[str] = []
    beats: list[int] = []
    lease = Lease(lease_client, key, 1.5, token="cut-off", fence=reasons.append)
    lease.on_beat.append(lambda: beats.append(1))
    assert lease.try_acquire()
    lease.start_heartbeat()
    wait_for(lambda: bool(beats), 5, "a first renewal")
    # When its connection to Redis is cut (every new connection goes to a closed port)
    lease_client.connection_pool.connection_kwargs["port"] = 1
    lease_client.connection_pool.disconnect()
    lease_client.connection_pool.reset()
    # Then it fences itself before its lease can expire
    wait_for(lambda: bool(reasons), 10, "the fence")
    assert "could not renew" in reasons[0]
    lease.release()
    client.delete(key)


# -- a real partition worker ------------------------------------------------------------------

def _commands_on(url: str, key: str, seconds: float) -> set[str]:
    """The commands naming ``key`` that Redis executes in the next few seconds (MONITOR),
    until the first one."""
    client = redis.Redis.from_url(url, socket_timeout=1)
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    with client.monitor() as monitor:
        while not seen and time.monotonic() < deadline:
            try:
                command = str(monitor.next_command()["command"])
            except redis.TimeoutError:
                continue
            if key in command:
                seen.add(command.split(maxsplit=1)[0].upper())
    return seen


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_partition_worker_fetches_with_blmove_and_recovers_what_a_dead_one_left_in_transit(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, 1, tmp_path, processes)
    client = h.redis
    queue = f"{namespace}partition.p.0"
    in_transit = RedisKeys(namespace).in_transit(queue)
    # Given five events of one key queued, the oldest already moved to the in-transit list by
    # a worker that was killed before it recorded the message as unacked
    events, counts = keyed_events(1, 5, ms=2)
    h.publish(events)
    assert client.lmove(namespace + queue, in_transit, "RIGHT", "LEFT") is not None
    assert client.llen(namespace + queue) == 4
    # When a partition worker starts
    h.start_workers("w", "--partitions", "0")
    h.wait_done(5, timeout=60, logs=["w"])
    # Then the message caught in transit ran first, and every event ran once, in order
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()
    assert client.llen(in_transit) == 0
    # And, idle on its empty queue, the worker blocks in BLMOVE (queue -> in-transit), not
    # in kombu's BRPOP, which loses a message popped just before a SIGKILL
    assert _commands_on(url, namespace + queue, 15) in ({"BLMOVE"}, {"BRPOPLPUSH"})


def _bad_messages(h: Harness, queue: str) -> list[str]:
    """Four messages no worker can run, pushed between good ones; returns their ids."""
    from kombu import Connection, Queue

    client = h.redis
    ns = h.ns
    client.lpush(ns + queue, b"\x00\xff not JSON at all")
    client.lpush(ns + queue, json.dumps({"hello": "JSON, but no kombu envelope"}))
    headers = {"partition_key": "Order:bad", "partition_pool": "p", "partition_index": 0,
               "partition_count": 1}
    with Connection(h.broker, transport_options={"global_keyprefix": ns}) as conn:
        producer = conn.Producer()
        target = Queue(queue, routing_key=queue)
        producer.publish(b"{this is not json", exchange="", routing_key=queue, declare=[target],
                         content_type="application/json", content_encoding="utf-8",
                         headers={**headers, "task": "ordering.record", "id": "bad-body"})
        producer.publish(json.dumps([["Order:gone", 0], {}, {}]), exchange="", routing_key=queue,
                         declare=[target], content_type="application/json",
                         content_encoding="utf-8",
                         headers={"partition_key": "Order:gone", "partition_pool": "p",
                                  "task": "no.such.task", "id": "unknown-task"})
    return ["bad-body", "unknown-task"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_malformed_messages_become_dead_letters_and_the_worker_goes_on(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, 1, tmp_path, processes)
    queue = f"{namespace}partition.p.0"
    # Given good events, then four malformed messages, then more good events, on one partition
    events, counts = keyed_events(5, 40, ms=2)
    h.publish(events[:20])
    ids = _bad_messages(h, queue)
    h.publish(events[20:])
    # When a partition worker consumes them
    h.start_workers("w", "--partitions", "0")
    h.wait_done(40, timeout=60, logs=["w"])
    # Then every good event ran, in order per key, and the worker never restarted
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()
    assert "exited with" not in h.log_text("w"), h.log_text("w")[-3000:]
    # And each malformed message is a dead letter with its raw bytes and the reason
    listed = h.cli("dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert sorted(letter["reason"] for letter in letters) == ["MALFORMED"] * 4
    errors = " | ".join(letter["error"] for letter in letters)
    for why in ("not JSON", "not a kombu message envelope", "cannot be decoded", "unknown task"):
        assert why in errors, errors
    by_id = {letter["id"]: letter for letter in letters}
    assert set(ids) <= set(by_id)
    assert by_id["unknown-task"]["key"] == "Order:gone"  # its key is parked like any other
    # And nothing of theirs is left in the queue, unacked or in transit
    client = h.redis
    assert client.llen(namespace + queue) == 0
    assert client.hlen(f"{namespace}unacked") == 0
    assert client.llen(RedisKeys(namespace).in_transit(queue)) == 0
    # And a discard removes one like any other dead letter
    discarded = h.cli("dead-letters", "discard", "--key", "Order:gone")
    assert discarded.returncode == 0, discarded.stderr
    assert len(json.loads(h.cli("dead-letters", "list", "--json").stdout)) == 3




@pytest.mark.integration
def test_a_holder_frozen_past_the_ttl_is_not_fresh_and_fences_before_running_a_message(
        lease_key: tuple[redis.Redis, str], lease_clock: dict[str, float]) -> None:
    client, key = lease_key
    offset = lease_clock
    reasons: list[str] = []
    # Given a holder that took its lease (no heartbeat: as if it had not woken up yet)
    lease = Lease(client, key, 3.0, token="blocked", fence=reasons.append)
    assert lease.try_acquire()
    assert lease.fresh() and not reasons
    # When its process was frozen longer than the TTL while its fetch received a message
    offset["s"] = 4.0
    # Then the partition thread's check before running it says no, and the holder is fenced
    assert not lease.fresh()
    assert reasons and "frozen or cut off" in reasons[0]
    lease.release()
    client.delete(key)
