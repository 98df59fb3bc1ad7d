"""Repeated Sentinel failovers as a user runs them (issue 27): every run resumes, in order.

Given a private master, replica and three sentinels (``down-after-milliseconds`` 1500,
``failover-timeout`` 6000) as broker and store of `celery partitioning worker` (4 partitions
on 2 processes, lease TTL 3 s) and 2,000 keyed events of 100 keys,
when the master is SIGKILLed once 30 % ran and the sentinels promote the replica, the old
master left down (even runs) or brought back as the new master's replica (odd runs),
then every run prints its verdict and passes only if: consumption resumed within 10 s of
the promotion, all 2,000 ran, 0 out of order, 0 lost, 0 overlaps (per key and per
partition), and no worker process exited within a second of its start.
See ``failover.py`` for the scenario. Knobs: CP_SENTINEL_SOAK_RUNS (CI 2, soak 20),
CP_SENTINEL_SOAK_EVENTS (2,000), CP_FREEZE (seconds the replica is frozen at the kill: a slow
promotion, as on a loaded host; default 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.conftest import Workload, size
from tests.reliability.failover import run_failover
from tests.support.procs import Processes

pytestmark = pytest.mark.integration

RUNS = size("SENTINEL_SOAK_RUNS", 2, 20)


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.timeout(300)
def test_failover_resumes(run: int, workload_factory: Callable[..., Workload],
                          processes: Processes, tmp_path: Path,
                          say: Callable[[str], None]) -> None:
    rejoin = run % 2 == 1
    verdict, w = run_failover(workload_factory, processes, tmp_path, rejoin=rejoin,
                              events_total=size("SENTINEL_SOAK_EVENTS", 2000, 2000), seed=27 + run,
                              freeze_replica=float(os.environ.get("CP_FREEZE", "0")))
    say(verdict.line())
    assert verdict.ok, verdict.line() + "\n--- worker log\n" + w.log_tail(chars=8000)
