"""Repeated Sentinel failovers (issue 27): every run resumes on the new master, in order."""

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
