"""An elastic fleet: `partitioning worker --balance` groups join and leave while keys drain.

Given a pool of 12 partitions and a steady keyed stream (10 ms tasks), when worker groups
join one by one, one is SIGTERMed, one's process is SIGKILLed and one's process is frozen
(SIGSTOP) past the lease TTL and resumed, then the partitions spread evenly over the live
processes after each change (read from the lease holders), every key ran in order, nothing
was lost, and no partition ever ran two tasks at once. Rebalance times are printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from subprocess import Popen
from typing import Any

import pytest

from celery_partitioning.state import redis_keys, settings_of
from celery_partitioning.store.lease import read_holders
from tests.reliability.conftest import Workload, keyed_events
from tests.reliability.test_chaos import live_children
from tests.support.procs import ROOT, celery_bin, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 12
#: Goal 10 s after a join (two beats and a hand-over); the bound leaves room for a loaded box.
REBALANCE_BOUND = 25.0


def holders(w: Workload) -> Counter[int]:
    """How many partitions each process holds (by pid)."""
    queues = [settings_of(w.app).queue_name("p", i) for i in range(w.partitions)]
    found = read_holders(w.redis, redis_keys(w.app), queues)
    return Counter(holder.pid for holder in found.values() if holder is not None)


def status_members(w: Workload) -> dict[str, Any]:
    """The pool's members as ``partitioning status --json`` shows them."""
    result = subprocess.run([celery_bin(), "-A", "tests.apps.reliability_app", "partitioning",
                             "status", "--json"],
                            env={**os.environ, "PYTHONPATH": str(ROOT), **w.env()}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    members: dict[str, Any] = json.loads(result.stdout)["members"]["p"]
    return members


def test_partitions_spread_over_joining_and_leaving_workers_without_overlap(
        workload_factory: Callable[..., Workload], say: Callable[[str], None]) -> None:
    w = workload_factory(PARTITIONS, ms=10)
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

    def child_of(supervisor: Popen[bytes]) -> int:
        wait_for(lambda: len(live_children(supervisor.pid)) == 1, 30, "the worker process")
        return int(live_children(supervisor.pid)[0].pid)

    try:
        w.publish(chunks[0])
        a = w.start_workers("a", processes=1, extra=["--balance"])
        spread_reaches([12], "the first group started")
        b = w.start_workers("b", processes=1, extra=["--balance"])
        w.publish(chunks[1])
        spread_reaches([6, 6], "a second group joined")
        c = w.start_workers("c", processes=1, extra=["--balance"])
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
        stopped.add(victim)
        w.publish(chunks[4])
        wait_for(lambda: victim not in holders(w), REBALANCE_BOUND, "the killed process's leases")
        spread_reaches([6, 6], "a process was SIGKILLed and restarted")
        # a process is frozen past the lease TTL while messages keep coming (frozen between
        # two tasks: a body frozen halfway finishes when resumed, which only fencing the
        # task's own writes, as checkpoints do, can stop): the others take its partitions;
        # resumed, it finds its leases stale and fences itself (exit 75) without running what
        # it had fetched, and its successor rejoins
        w.wait_done(sum(len(chunk) for chunk in chunks[:5]), timeout=120, counts=None)
        frozen = child_of(a)
        os.kill(frozen, signal.SIGSTOP)
        stopped.add(frozen)
        try:
            w.publish(chunks[5])
            started = time.monotonic()
            wait_for(lambda: frozen not in holders(w) and sum(holders(w).values()) == 12,
                     REBALANCE_BOUND, "the frozen process's partitions to be taken over")
            times.append(f"taken from a frozen process: {time.monotonic() - started:.1f}s")
        finally:
            os.kill(frozen, signal.SIGCONT)
        spread_reaches([6, 6], "the frozen process fenced itself and its successor rejoined")
        w.wait_done(len(events), timeout=180, counts=counts)
        report = w.report(counts)
        overlaps = w.partition_overlaps(stopped)
        say(f"elastic fleet: {len(events)} events, {PARTITIONS} partitions; rebalances: "
            f"{'; '.join(times)}; {report.summary()}")
        assert report.ok, report.summary() + "\n" + w.log_tail("a") + w.log_tail("c")
        assert not overlaps, overlaps[:5]
        for group in (a, c):
            group.send_signal(signal.SIGTERM)
        for group in (a, c):
            assert group.wait(timeout=60) == 0
    finally:
        w.processes.kill_all()
