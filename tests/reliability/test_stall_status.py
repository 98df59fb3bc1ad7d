"""`partitioning status` shows a stalled partition: its holder took no message for longer
than --stall-after while its queue has messages (issue 27).

Given `celery partitioning worker` over 2 partitions, and a key whose first message runs for
a long time (6 s) with more messages of that key queued behind it,
when `status --json --stall-after 1` is read while it runs,
then that partition is reported stalled (with how long since its holder took a message) and
the other one (an empty queue) is not; once everything ran, no partition is stalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from celery_partitioning import partition_for
from tests.apps.reliability_app import RECORD_TASK
from tests.reliability.conftest import Workload
from tests.support.procs import ROOT, celery_bin, wait_for

pytestmark = pytest.mark.integration


def _status(w: Workload) -> list[dict[str, Any]]:
    result = subprocess.run([celery_bin(), "-A", "tests.apps.reliability_app", "partitioning",
                             "status", "--json", "--stall-after", "1"],
                            env={**os.environ, "PYTHONPATH": str(ROOT), **w.env()}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)["partitions"]
    return rows


@pytest.mark.timeout(120)
def test_status_shows_a_partition_whose_holder_takes_nothing(
        workload_factory: Callable[..., Workload]) -> None:
    w = workload_factory(2)
    w.lease_ttl = 3.0
    key = "Order:slow"
    slow = partition_for(key, 2)
    supervisor = w.start_workers(processes=1)
    wait_for(lambda: all(r["consumer"] for r in _status(w)), 60, "both partitions held")
    record = w.app.tasks[RECORD_TASK]
    record.apply_async((key, 0), {"ms": 6000})
    for seq in range(1, 4):
        record.apply_async((key, seq), {"ms": 1})
    rows: list[dict[str, Any]] = []

    def stalled_now() -> bool:
        nonlocal rows
        rows = _status(w)
        return bool(rows[slow]["stalled"])

    wait_for(stalled_now, 20, "the slow partition to be reported stalled", interval=0.3)
    assert rows[slow]["depth"] == 3 and rows[slow]["last_consumed_age"] > 1, rows
    assert not rows[1 - slow]["stalled"], rows  # nothing queued: idle, not stalled
    w.wait_done(4, timeout=60)
    rows = _status(w)
    assert not any(r["stalled"] for r in rows), rows
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(timeout=30)
