"""An elastic fleet: `partitioning worker` groups (the same command, no --partitions) join
and leave while keys drain, on Redis and on RabbitMQ.

Given a pool of 12 partitions and a steady keyed stream (10 ms tasks), when worker groups
join one by one, one is SIGTERMed, one's process is SIGKILLed and one's process is frozen
(SIGSTOP) past the lease TTL and resumed, then the partitions spread evenly over the live
processes after each change (read from the lease holders: with the Redis store a partition
thread takes the lease on RabbitMQ too), every key ran in order, nothing was lost, and no
partition ever ran two tasks at once. Rebalance times are printed.

On RabbitMQ single active consumer stays the broker-side guard: a frozen process stays the
active consumer of its queues until it resumes, finds its leases stale and fences itself
(its connection closes, its unacked message goes back to the head for the new holder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from subprocess import Popen
from typing import Any

import pytest

from celery_partitioning.state import redis_keys, settings_of
from celery_partitioning.store.lease import read_holders
from tests.reliability.conftest import Workload, keyed_events
from tests.reliability.test_chaos import live_children
from tests.reliability.test_rabbitmq_drop import delete_queues
from tests.support.procs import ROOT, celery_bin, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 12
#: Goal 10 s after a join (two beats and a hand-over); the bound leaves room for a loaded box.
REBALANCE_BOUND = 25.0


def holders(w: Workload) -> Counter[int]:
    """How many partitions each process holds (by pid): the lease holders (on RabbitMQ too,
    with the Redis store)."""
    queues = [settings_of(w.app).queue_name("p", i) for i in range(w.partitions)]
    found = read_holders(w.redis, redis_keys(w.app), queues)
    return Counter(holder.pid for holder in found.values() if holder is not None)


def freeze_one(w: Workload, frozen: int, chunk: list[tuple[str, int]], times: list[str]) -> int:
    """Freeze process ``frozen`` past the lease TTL while ``chunk`` is published (between two
    tasks: a body frozen halfway finishes when resumed, which only fencing the task's own
    writes, as checkpoints do, can stop): the others take its partitions; resumed, it finds
    its leases stale and fences itself (exit 75) without running what it had fetched."""
    os.kill(frozen, signal.SIGSTOP)
    try:
        w.publish(chunk)
        started = time.monotonic()
        wait_for(lambda: frozen not in holders(w) and sum(holders(w).values()) == PARTITIONS,
                 REBALANCE_BOUND, "the frozen process's partitions to be taken over")
        times.append(f"taken from a frozen process: {time.monotonic() - started:.1f}s")
    finally:
        os.kill(frozen, signal.SIGCONT)
    return frozen


def status_members(w: Workload) -> dict[str, Any]:
    """The pool's members as ``partitioning status --json`` shows them."""
    result = subprocess.run([celery_bin(), "-A", "tests.apps.reliability_app", "partitioning",
                             "status", "--json"],
                            env={**os.environ, "PYTHONPATH": str(ROOT), **w.env()}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    members: dict[str, Any] = json.loads(result.stdout)["members"]["p"]
    return members


@pytest.fixture(params=["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def fleet_workload(request: pytest.FixtureRequest, workload_factory: Callable[..., Workload],
                   records_url: str) -> Iterator[Workload]:
    """The workload on Redis, or on RabbitMQ with the Redis store (where members meet) and a
    control exchange of its own (node names repeat across concurrent runs)."""
    if request.param == "redis":
        yield workload_factory(PARTITIONS, ms=10)
        return
    amqp_url: str = request.getfixturevalue("amqp_url")
    ns = f"cpfleet{uuid.uuid4().hex[:8]}"
    w = workload_factory(PARTITIONS, broker=amqp_url, store=records_url, ms=10,
                         conf={"control_exchange": f"{ns}celery"})
    try:
        yield w
    finally:
        delete_queues(amqp_url, [settings_of(w.app).queue_name("p", i) for i in range(PARTITIONS)])


def test_partitions_spread_over_joining_and_leaving_workers_without_overlap(
        fleet_workload: Workload, say: Callable[[str], None]) -> None:
    w = fleet_workload
    rabbitmq = not w.broker.startswith("redis")
    events, counts = keyed_events(120, 2400, seed=23)
    chunks = [events[i * len(events) // 6:(i + 1) * len(events) // 6] for i in range(6)]
    stopped: set[int] = set()
    times: list[str] = []

    def spread_reaches(shape: list[int], what: str) -> None:
        started = time.monotonic()
        wait_for(lambda: sorted(holders(w).values()) == shape, REBALANCE_BOUND,
                 f"the partitions to spread as {shape} after {what} (now {dict(holders(w))})",
                 interval=0.1)
        times.append(f"{what}: {time.monotonic() - started:.1f}s")

    def group(name: str) -> Popen[bytes]:
        # node names of their own: groups on one host would share partitions0@host
        return w.start_workers(name, processes=1,
                               extra=["--", "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h"])

    def child_of(supervisor: Popen[bytes]) -> int:
        wait_for(lambda: len(live_children(supervisor.pid)) == 1, 30, "the worker process")
        return int(live_children(supervisor.pid)[0].pid)

    try:
        w.publish(chunks[0])
        a = group("a")
        spread_reaches([12], "the first group started")
        b = group("b")
        w.publish(chunks[1])
        spread_reaches([6, 6], "a second group joined")
        c = group("c")
        w.publish(chunks[2])
        spread_reaches([4, 4, 4], "a third group joined")
        # status shows the three members, what each holds, and no rebalance left
        view = status_members(w)
        assert len(view["members"]) == 3 and view["moving"] == 0, view
        assert sorted(len(m["holds"]) for m in view["members"]) == [4, 4, 4], view
        # a group leaves warmly
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=60) == 0, w.log_tail("b")
        w.publish(chunks[3])
        spread_reaches([6, 6], "a group left with SIGTERM")
        # a process dies: its supervisor starts another, which joins as a new member
        victim = child_of(c)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        stopped.add(victim)
        w.publish(chunks[4])
        wait_for(lambda: victim not in holders(w) and sorted(holders(w).values()) == [6, 6],
                 REBALANCE_BOUND, "the killed process's successor to hold its partitions")
        times.append(f"a process was SIGKILLed, its successor holding its partitions: "
                     f"{time.monotonic() - killed_at:.1f}s")
        w.wait_done(sum(len(chunk) for chunk in chunks[:5]), timeout=120, counts=None)
        stopped.add(freeze_one(w, child_of(a), chunks[5], times))
        spread_reaches([6, 6], "the frozen process fenced itself and its successor rejoined")
        w.wait_done(len(events), timeout=180, counts=counts)
        report = w.report(counts)
        overlaps = w.partition_overlaps(stopped)
        say(f"elastic fleet ({'rabbitmq' if rabbitmq else 'redis'}): {len(events)} events, "
            f"{PARTITIONS} partitions; rebalances: {'; '.join(times)}; {report.summary()}")
        assert report.ok, report.summary() + "\n" + w.log_tail("a") + w.log_tail("c")
        assert not overlaps, overlaps[:5]
        for supervisor in (a, c):
            supervisor.send_signal(signal.SIGTERM)
        for supervisor in (a, c):
            assert supervisor.wait(timeout=60) == 0
    finally:
        w.processes.kill_all()
