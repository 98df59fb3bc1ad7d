"""Exclusive consumers, warm shutdown and the misroute guard, with real `celery partitioning worker`s."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from celery_partitioning import partition_for
from celery_partitioning.store.keys import RedisKeys
from celery_partitioning.store.lease import parse_holder
from tests.apps.harness import HOLD_MS, Harness, keyed_events, rerun_in_place
from tests.support.ordering import check, concurrent_runs
from tests.support.procs import Processes, alive, wait_for

pytestmark = pytest.mark.integration



@pytest.mark.timeout(120)
def test_second_worker_on_a_partition_is_a_standby_and_takes_over_in_order(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    # Given one partition and a first `worker` command holding its lease
    url = redis_url
    h = Harness(url, url, namespace, 1, tmp_path, processes, lease_ttl=2.0)
    queue = f"{namespace}partition.p.0"
    lease_key = RedisKeys(namespace).lease(queue)
    client = h.redis
    first = h.start_workers("first", "--partitions", "0")
    wait_for(lambda: client.get(lease_key) is not None, 30, "the first worker's lease")
    holder = parse_holder(client.get(lease_key))
    assert holder is not None

    # When a second `worker` command starts on the same partition
    second = h.start_workers("second", "--partitions", "0")
    wait_for(lambda: "standby" in h.log_text("second"), 30, "the second worker to wait as standby")

    events, counts = keyed_events(20, 400, ms=4)
    slow_at = len(events) // 2
    key, seq, _ms, _sig = events[slow_at]
    events[slow_at] = (key, seq, HOLD_MS, "slow")
    h.publish(events)
    pid, _label, slow_key, slow_seq = h.next_signal("slow", timeout=60)
    assert pid == holder.pid  # only the lease holder ran anything so far
    # While it runs, the held message is in the partition's in-transit list, not in kombu's
    # unacked hash: no visibility-timeout restore (any worker, any host) can re-deliver it.
    assert client.llen(RedisKeys(namespace).in_transit(queue)) == 1
    assert client.hlen(f"{namespace}unacked") == 0

    # And the active one dies (the whole command: supervisor and child)
    h.processes.signal(first, signal.SIGKILL)
    killed_at = time.monotonic()

    def successor_started() -> bool:
        return any(p != holder.pid for _k, p, _key, _s in h.partition_log("p.0"))

    wait_for(successor_started, 30, "the standby to take over")
    takeover = time.monotonic() - killed_at

    # Then the standby finishes the work, in order, having never run concurrently
    h.wait_done(400, timeout=60, logs=["second"])
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()
    assert rerun_in_place(h.records([slow_key])[slow_key], slow_seq)
    log = h.partition_log("p.0")
    assert not concurrent_runs(log, killed={holder.pid})
    pids = [p for _k, p, _key, _s in log]
    first_other = next(i for i, p in enumerate(pids) if p != holder.pid)
    assert holder.pid not in pids[first_other:], "the old holder ran after the standby took over"
    assert takeover < 2.0 + 5.0, f"takeover took {takeover:.1f}s (lease TTL 2 s)"

    h.processes.signal(second, signal.SIGTERM)
    assert second.wait(timeout=60) == 0
    assert client.get(lease_key) is None  # released on clean exit


@pytest.mark.timeout(120)
def test_warm_shutdown_mid_run_then_restart_keeps_order_and_loses_nothing(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, 2, tmp_path, processes)
    events, counts = keyed_events(30, 600, ms=10)
    sup = h.start_workers("run1")
    h.publish(events)
    h.wait_done(60, timeout=60, logs=["run1"])

    # When the command gets SIGTERM mid-run
    h.processes.signal(sup, signal.SIGTERM)
    assert sup.wait(timeout=60) == 0, h.log_text("run1")[-3000:]
    stopped_at = h.done()
    assert stopped_at < 600, "the run finished before the shutdown: the test proved nothing"
    client = h.redis
    assert client.hlen(f"{namespace}unacked") == 0  # nothing left held
    depth = sum(client.llen(f"{namespace}{namespace}partition.p.{i}") for i in range(2))
    assert depth + stopped_at == 600

    # Then a restart finishes the rest, in order, without re-running anything
    sup2 = h.start_workers("run2")
    h.wait_done(600, timeout=60, logs=["run2"])
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()
    assert report.reruns == 0
    h.processes.signal(sup2, signal.SIGTERM)
    assert sup2.wait(timeout=60) == 0


@pytest.mark.timeout(120)
def test_misrouted_messages_move_to_their_partition_after_a_resize(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    # Given messages published while the pool had 2 partitions
    url = redis_url
    h = Harness(url, url, namespace, 4, tmp_path, processes)
    events, counts = keyed_events(24, 240, ms=2)
    moved = [k for k in counts if partition_for(k, 2) != partition_for(k, 4)]
    assert moved
    h.publish(events, partitions=2)

    # When the workers run with 4 partitions
    sup = h.start_workers("workers")
    h.wait_done(240, timeout=60, logs=["workers"])

    # Then every key ran, in order, on the partition it maps to now
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()
    for index in range(4):
        for _kind, _pid, key, _seq in h.partition_log(f"p.{index}"):
            assert partition_for(key, 4) == index, f"{key} ran on p.{index}"
    assert "misrouted message" in h.log_text("workers")
    h.processes.signal(sup, signal.SIGTERM)
    assert sup.wait(timeout=60) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["starting", "running a task"])
def test_children_stop_warmly_and_release_their_lease_when_the_supervisor_dies(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path, when: str) -> None:
    # Given a partition child that holds its lease: still starting (printing its banner),
    # or inside a task (held until released) with two more messages of its key queued behind it
    url = redis_url
    h = Harness(url, url, namespace, 1, tmp_path, processes, lease_ttl=30.0)
    lease_key = RedisKeys(namespace).lease(f"{namespace}partition.p.0")
    client = h.redis
    sup = h.start_workers("workers")
    wait_for(lambda: client.get(lease_key) is not None, 30, "the lease")
    child = parse_holder(client.get(lease_key))
    assert child is not None
    if when == "running a task":
        h.publish([("Order:1", 0, HOLD_MS, "slow"), ("Order:1", 1, 2, None),
                   ("Order:1", 2, 2, None)])
        h.next_signal("slow", timeout=30)

    # When the supervisor alone is SIGKILLed (not its process group): nobody reads the
    # child's output pipe any more
    sup.kill()
    sup.wait(timeout=10)

    # Then, well before the 30 s TTL, the orphan stops warmly and releases the lease, and says
    # so where the supervisor printed, instead of dying on a broken pipe
    said = rf"^\[p\.0\] .* supervisor \(pid {sup.pid}\) is gone: warm shutdown$"
    if when == "running a task":
        # its warm stop (logged once it started: the notice above comes earlier) waits for
        # the running task, which ends once released
        wait_for(lambda: "warm stop: every partition finishes its task" in h.log_text("workers"),
                 10, "the orphaned child to begin its warm shutdown")
        assert client.get(lease_key) is not None and alive(child.pid)
        assert h.records(["Order:1"])["Order:1"] == ["start 0"]
        h.release("Order:1", 0)
    wait_for(lambda: client.get(lease_key) is None, 10, "the orphaned child to release its lease")
    wait_for(lambda: not alive(child.pid), 10, "the orphaned child to exit")
    log = h.log_text("workers")
    assert re.search(said, log, re.MULTILINE), log[-3000:]
    for sign in ("Unrecoverable error", "Broken pipe", "BrokenPipeError", "Traceback"):
        assert sign not in log, log[-3000:]
    if when == "running a task":
        # the running task finished and was acked; the rest wait, in order, for a successor
        assert h.records(["Order:1"])["Order:1"] == ["start 0", "end 0"]
        assert h.done() == 1
        assert client.hlen(f"{namespace}unacked") == 0
        assert client.llen(f"{namespace}{namespace}partition.p.0") == 2
        successor = h.start_workers("successor")
        h.wait_done(3, timeout=30, logs=["successor"])
        assert h.records(["Order:1"])["Order:1"] == [
            "start 0", "end 0", "start 1", "end 1", "start 2", "end 2"]
        h.processes.signal(successor, signal.SIGTERM)
        assert successor.wait(timeout=30) == 0


@pytest.mark.timeout(60)
def test_a_standby_stops_cleanly_on_sigterm_and_the_holder_releases_its_lease(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, 1, tmp_path, processes, lease_ttl=30.0)
    lease_key = RedisKeys(namespace).lease(f"{namespace}partition.p.0")
    client = h.redis
    # both pinned to the partition: the second waits for its lease (balanced, it would be a
    # member that holds nothing: the next test)
    first = h.start_workers("first", "--partitions", "0")
    wait_for(lambda: client.get(lease_key) is not None, 30, "the first worker's lease")
    second = h.start_workers("second", "--partitions", "0")
    wait_for(lambda: "standby" in h.log_text("second"), 30, "the standby")

    h.processes.signal(second, signal.SIGTERM)
    assert second.wait(timeout=20) == 0, h.log_text("second")[-2000:]
    assert "stopped while standby" in h.log_text("second")
    h.processes.signal(first, signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    assert client.get(lease_key) is None  # released at once, not after the 30 s TTL


@pytest.mark.timeout(120)
def test_a_second_balanced_command_with_nothing_left_to_hold_takes_over_when_the_first_leaves(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    # Given one partition and two identical commands (no --partitions): more members than
    # partitions, so the second holds nothing while the first runs
    url = redis_url
    h = Harness(url, url, namespace, 1, tmp_path, processes, lease_ttl=30.0)
    lease_key = RedisKeys(namespace).lease(f"{namespace}partition.p.0")
    client = h.redis
    members = RedisKeys(namespace).members("p")
    first = h.start_workers("first")
    wait_for(lambda: client.get(lease_key) is not None, 30, "the first worker's lease")
    holder = parse_holder(client.get(lease_key))
    assert holder is not None
    second = h.start_workers("second")
    wait_for(lambda: client.hlen(members) == 2, 30, "the second command to join")
    events, counts = keyed_events(10, 200, ms=2)
    h.publish(events[:100])
    h.wait_done(100, timeout=60, logs=["first"])
    assert {p for _k, p, _key, _s in h.partition_log("p.0")} == {holder.pid}

    # When the first leaves warmly, the second takes the partition (released, not expired:
    # well within the 30 s TTL) and finishes the keys in order, never concurrently
    h.processes.signal(first, signal.SIGTERM)
    assert first.wait(timeout=30) == 0, h.log_text("first")[-2000:]
    left = time.monotonic()
    h.publish(events[100:])
    h.wait_done(200, timeout=60, logs=["second"])
    assert time.monotonic() - left < 20
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()
    log = h.partition_log("p.0")
    assert not concurrent_runs(log, killed=set())
    assert len({p for _k, p, _key, _s in log}) == 2
    h.processes.signal(second, signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    assert client.get(lease_key) is None and client.hlen(members) == 0
