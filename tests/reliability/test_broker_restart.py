"""Broker restart: the broker dies mid-run and comes back; workers reconnect, nothing lost or reordered.

Given a private ``redis-server`` with ``appendonly yes`` / ``appendfsync always`` as the broker
(and lease store) of `celery partitioning worker` over 4 partitions, and a keyed stream,
when the broker is SIGKILLed while the stream drains and restarted (AOF reload) seconds later,
and more events are published after it is back,
then every event ran, every key in publish order, no partition ran two tasks at once.

The tasks write their records to the test Redis (DB 14), not to the broker, so the
restart tests the workers and the broker, not the task's own storage.
Knobs: CP_RESTART_EVENTS (CI 1,200; soak 5,000), CP_RESTART_KEYS (120; 300), CP_RESTART_DOWN_MS (2000).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.reliability.conftest import PrivateRedis, Workload, keyed_events, size
from tests.support.procs import Processes, wait_for

pytestmark = pytest.mark.integration


def test_broker_killed_and_restarted_mid_run(workload_factory: Callable[..., Workload], processes: Processes,
                                             tmp_path: Path, say: Callable[[str], None]) -> None:
    events_total = size("RESTART_EVENTS", 1200, 5000)
    keys = size("RESTART_KEYS", 120, 300)
    down = size("RESTART_DOWN_MS", 2000, 2000) / 1000
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = PrivateRedis(processes, broker_dir)
    broker.start()

    w = workload_factory(4, broker=broker.url, ms=5)
    events, counts = keyed_events(keys, events_total, seed=5)
    before, after = events[: events_total * 3 // 4], events[events_total * 3 // 4:]
    w.publish(before)
    queued = redis.Redis.from_url(broker.url)
    # The names below are right: checked before the workers start (started first, they can
    # drain the queues as fast as the publisher fills them, and the read then finds them empty).
    assert sum(int(queued.llen(f"{w.ns}{w.ns}partition.p.{i}")) for i in range(4)) == len(before)
    supervisor = w.start_workers()
    wait_for(lambda: w.done() >= len(before) // 4, 90, "a quarter of the first batch to run")

    broker.kill()  # mid-drain: messages queued, some reserved/unacked, leases held
    done_at_kill = w.done()
    time.sleep(down)
    broker.start()  # same port, same directory: the AOF is replayed
    w.publish(after)  # producers reconnect too
    w.wait_done(events_total, timeout=120, counts=counts)

    # Nothing may be left behind to be delivered again later (a late duplicate is a reorder).
    client = redis.Redis.from_url(broker.url)

    def leftovers() -> dict[str, int]:
        found = {"unacked": int(client.hlen(f"{w.ns}unacked"))}
        for index in range(w.partitions):
            found[f"p.{index}"] = int(client.llen(f"{w.ns}{w.ns}partition.p.{index}"))
        return {k: v for k, v in found.items() if v}

    try:
        wait_for(lambda: not leftovers(), 20, "no unacked or queued message left on the broker")
    except AssertionError:
        pytest.fail(f"left on the broker after draining: {leftovers()} "
                    f"{[v[:300] for v in client.hvals(f'{w.ns}unacked')][:3]}")
    report = w.report(counts)
    overlaps = w.partition_overlaps(killed=set())
    restarts = w.log_tail(chars=10**7).count("exited with")
    say(f"broker restart: {events_total} events, {keys} keys, broker down {down:.1f}s after {done_at_kill} "
        f"done; {restarts} partition worker restart(s); {report.summary()}")
    assert done_at_kill < len(before), "the broker died after the first batch was drained: test proved little"
    assert report.ok, report.summary() + "\n--- worker log\n" + w.log_tail()
    assert not overlaps, overlaps[:5]
    supervisor.send_signal(signal.SIGTERM)
