"""Redis Sentinel failover: the master dies mid-run, a replica is promoted, workers go on by themselves.

Given a private Sentinel setup (one master, one replica, three sentinels; passwords on the
data nodes and on the sentinels) as the broker *and* the partitioning store of
`celery partitioning worker` over 4 partitions (``sentinel://`` URLs, ``master_name`` and
``sentinel_kwargs`` in ``broker_transport_options``), and a keyed stream,
when the master is SIGKILLed while the stream drains (after the producer's messages reached
the replica), the sentinels promote the replica, and more events are published afterwards,
then every event ran, every key in publish order, no partition ran two tasks at once, each
partition's lease lives on the new master, and nothing is left queued or unacked.

Two ways through a failover:
* ``partitioning_wait_for_replicas = 1``, lease TTL 2 s: the failover outlasts 70% of the
  TTL, so every holder fences itself; its restarted successor takes the lease on the new
  master (once the old master is back as its replica: every write waits for one) and puts
  the partition's unacked messages back at the head first.
* no waiting, lease TTL 10 s: the holders keep their lease through the failover; each
  consumer reconnects to the new master by itself (no restart) and puts the partition's
  unacked messages back at the head before it consumes again.

The tasks write their records to the test Redis (DB 14), never to the Sentinel setup.
Knobs: CP_SENTINEL_EVENTS (CI 1,000; soak 4,000), CP_SENTINEL_KEYS (100; 300).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_partitioning.store.keys import RedisKeys
from tests.reliability.conftest import Workload, keyed_events, size
from tests.reliability.sentinel import SentinelSetup
from tests.support.procs import ROOT, Processes, celery_bin, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("wait", "ttl"), [
    pytest.param(1, 2.0, id="wait-for-a-replica-holders-fence"),
    pytest.param(0, 10.0, id="no-wait-holders-reconnect"),
])
@pytest.mark.timeout(180)
def test_master_killed_and_replica_promoted_mid_run(workload_factory: Callable[..., Workload],
                                                    processes: Processes, tmp_path: Path,
                                                    say: Callable[[str], None], wait: int,
                                                    ttl: float) -> None:
    events_total = size("SENTINEL_EVENTS", 1000, 4000)
    keys = size("SENTINEL_KEYS", 100, 300)
    setup = SentinelSetup(processes, tmp_path)
    setup.start()

    w = workload_factory(4, broker=setup.url(), ms=5, conf={
        "broker_transport_options": setup.transport_options(),
        "partitioning_wait_for_replicas": wait,
        "partitioning_wait_for_replicas_timeout": 0.3,
    })
    w.lease_ttl = ttl
    events, counts = keyed_events(keys, events_total, seed=14)
    before, after = events[: events_total * 3 // 4], events[events_total * 3 // 4:]
    w.publish(before)
    queue_names = [f"{w.ns}{w.ns}partition.p.{i}" for i in range(w.partitions)]
    old = setup.client()
    # the names below are right (read before the workers start: they may drain the queues as
    # fast as the publisher fills them)
    assert sum(int(old.llen(name)) for name in queue_names) == len(before)
    supervisor = w.start_workers()
    leases = [RedisKeys(w.ns).lease(f"{w.ns}partition.p.{i}") for i in range(w.partitions)]
    # (the processes take their balanced shares as they start: wait for every lease, on the
    # master, before the kill)
    wait_for(lambda: all(old.exists(name) for name in leases), 60,
             "the workers to hold every partition's lease on the master")
    wait_for(lambda: w.done() >= len(before) // 4, 60, "a quarter of the first batch to run")
    assert setup.replicated(), "the producer's messages did not reach the replica"

    promoted_after = setup.kill_master()  # mid-drain: queued, unacked, leases held
    done_at_kill = w.done()
    promoted_at = time.monotonic()
    # With a write acknowledged by one replica only, the new master needs a replica too.
    rejoined_after = setup.rejoin_old_master() if wait else 0.0
    wait_for(lambda: w.done() > done_at_kill, 60, "the workers to run a task on the new master")
    resumed_after = time.monotonic() - promoted_at
    w.publish(after)
    w.wait_done(events_total, timeout=60, counts=counts)

    new = setup.client()
    port = new.connection_pool.connection_kwargs["port"]
    # The promoted replica, or (old master rejoined as its replica) the old master again: on a
    # loaded box the sentinels may fail over a second time; either holds the whole data set.
    assert port == setup.replica.port or (wait and port == setup.master.port), port
    if port != setup.replica.port:
        say("sentinel failover: the sentinels failed over a second time, to the rejoined master")

    def leftovers() -> dict[str, int]:
        found = {"unacked": int(new.hlen(f"{w.ns}unacked"))}
        found.update({name: int(new.llen(name)) for name in queue_names})
        return {k: v for k, v in found.items() if v}

    try:
        wait_for(lambda: not leftovers(), 20, "no unacked or queued message left on the new master")
    except AssertionError:
        pytest.fail(f"left on the new master after draining: {leftovers()}")
    report = w.report(counts)
    log = w.log_tail(chars=10**7)
    # A process that ended (a holder fencing itself) left its last run open: it is over, not
    # concurrent with its successor's. Every other open run would be an overlap.
    ended = {int(pid) for pid in re.findall(r"\(pid (\d+)\) exited with", log)}
    overlaps = w.partition_overlaps(killed=ended)
    restarts = log.count("exited with")
    say(f"sentinel failover: {events_total} events, {keys} keys; master killed after {done_at_kill} "
        f"done, replica promoted after {promoted_after:.1f}s, old master back as a replica after "
        f"{rejoined_after:.1f}s, first task on the new master {resumed_after:.1f}s after the "
        f"promotion; {restarts} partition worker restart(s); {report.summary()}")
    assert done_at_kill < len(before), "the master died after the first batch was drained"
    assert all(new.exists(name) for name in leases), "no lease on the new master"
    assert report.ok, report.summary() + "\n--- worker log\n" + w.log_tail()
    assert not overlaps, overlaps[:5]
    assert "no lease" not in log and "dead letters and parking are off" not in log
    if not wait:
        assert restarts == 0, "a holder did not survive the failover: " + w.log_tail()
    # The operator's view goes through the same sentinels: the new master, every lease held.
    status = subprocess.run([celery_bin(), "-A", "tests.apps.reliability_app", "partitioning",
                             "status", "--json"], env={**os.environ, "PYTHONPATH": str(ROOT),
                                                       **w.env()},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["partitions"]
    assert [(r["depth"], r["unacked"]) for r in rows] == [(0, 0)] * w.partitions, rows
    assert all(r["consumer"] for r in rows), rows
    supervisor.send_signal(signal.SIGTERM)
