"""One Sentinel failover as a user runs it, measured: the scenario of the soak (issue 27).

A private master, replica and three sentinels (``down-after-milliseconds`` 1500,
``failover-timeout`` 6000) are the broker and the store of ``celery partitioning worker``
(4 partitions on 2 processes, lease TTL 3 s); a keyed stream is published, the master is
SIGKILLed once 30 % of it ran, and the sentinels promote the replica. The old master either
stays down or comes back as the new master's replica. :func:`run_failover` returns a
:class:`Verdict`: how long the promotion took, when consumption resumed after it, and what the
tasks recorded (order, loss, overlaps), never a timing guess.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.reliability.conftest import Workload, keyed_events
from tests.reliability.sentinel import SentinelSetup
from tests.support.ordering import OrderingReport
from tests.support.procs import Processes, wait_for

__all__ = ["Verdict", "run_failover", "RESUME_WITHIN"]

#: Seconds after the promotion within which the workers must run a task again.
RESUME_WITHIN = 10.0


@dataclass
class Verdict:
    """What one failover run showed."""

    rejoin: bool
    events: int
    done_at_kill: int = 0
    promoted_after: float = 0.0
    #: Seconds from the promotion to the first task that ended afterwards (None: never).
    resumed_after: float | None = None
    done: int = 0
    report: OrderingReport | None = None
    overlaps: int = 0
    restarts: int = 0
    quick_exits: int = 0

    @property
    def ok(self) -> bool:
        # quick_exits: a process restarted while no master was named waits for one; it must
        # not exit at once (issue 27: exit 1 after 0.0 s, then a growing restart backoff)
        return (self.report is not None and self.report.ok and not self.overlaps
                and self.done == self.events and self.resumed_after is not None
                and self.resumed_after <= RESUME_WITHIN and not self.quick_exits)

    def line(self) -> str:
        report = self.report
        resumed = "never" if self.resumed_after is None else f"{self.resumed_after:.1f}s"
        return (f"{'PASS' if self.ok else 'FAIL'} old master {'back as a replica' if self.rejoin else 'left down'}: "
                f"killed after {self.done_at_kill}/{self.events}, promoted after "
                f"{self.promoted_after:.1f}s, resumed {resumed} after the promotion, "
                f"{self.done}/{self.events} done; out of order "
                f"{len(report.out_of_order) if report else '?'}, lost "
                f"{len(report.lost) if report else '?'}, key overlaps "
                f"{len(report.overlaps) if report else '?'}, partition overlaps {self.overlaps}, "
                f"reruns {report.reruns if report else '?'}; {self.restarts} restart(s), "
                f"{self.quick_exits} within a second of their start")


def run_failover(make_workload: Callable[..., Workload], processes: Processes, tmp: Path, *,
                 rejoin: bool, events_total: int = 2000, keys: int = 100,
                 seed: int = 27, drain_timeout: float = 90,
                 freeze_replica: float = 0.0) -> tuple[Verdict, Workload]:
    """One failover run (see the module docstring); the workers are stopped afterwards."""
    setup = SentinelSetup(processes, tmp, down_after_ms=1500, failover_timeout_ms=6000)
    setup.start()
    w = make_workload(4, broker=setup.url(), ms=5,
                      conf={"broker_transport_options": setup.transport_options()})
    w.lease_ttl = 3.0
    events, counts = keyed_events(keys, events_total, seed=seed)
    verdict = Verdict(rejoin=rejoin, events=events_total)
    supervisor = w.start_workers(loglevel="info", processes=2)
    try:
        w.publish(events)
        # Every message on the replica before the kill (the workers' later writes may be
        # lost at the failover: a lost ack reruns a message, a lost fetch leaves it queued).
        wait_for(setup.replica_caught_up, 10, "the replica to have every message")
        wait_for(lambda: w.done() >= events_total * 3 // 10, 120, "30% of the events to run",
                 interval=0.02)
        verdict.done_at_kill = w.done()
        if freeze_replica:
            # a slow promotion (a loaded host): the workers restart while no master is named
            setup.replica_proc_signal(signal.SIGSTOP)
            threading.Timer(freeze_replica, setup.replica_proc_signal, (signal.SIGCONT,)).start()
        verdict.promoted_after = setup.kill_master()
        promoted_at = time.monotonic()
        done_at_promotion = w.done()
        if rejoin:
            setup.rejoin_old_master()
        try:
            wait_for(lambda: w.done() > done_at_promotion or w.done() >= events_total,
                     60, "a task to run after the promotion", interval=0.05)
            verdict.resumed_after = time.monotonic() - promoted_at
        except AssertionError:
            pass
        if verdict.resumed_after is not None:
            try:
                wait_for(lambda: w.done() >= events_total, drain_timeout, "every event to run",
                         interval=0.1)
            except AssertionError:
                pass
        verdict.done = w.done()
        verdict.report = w.report(counts)
        log = w.log_tail(chars=10**7)
        ended = {int(pid) for pid in re.findall(r"\(pid (\d+)\) exited with", log)}
        verdict.overlaps = len(w.partition_overlaps(killed=ended))
        verdict.restarts = log.count(") exited with")
        verdict.quick_exits = len(re.findall(r"\) exited with .* after 0\.\d+s", log))
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the fixture kills what is left
            processes.signal(supervisor, signal.SIGKILL)
    return verdict, w
