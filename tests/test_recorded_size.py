"""The recorded partition count is the truth: a pool's size cannot silently change between runs.

Given workers that ran pool ``p`` with 6 partitions (the first of them recorded 6 in the
store) and a backlog queued under 6, when workers are started with ``partitioning_pools``
giving the pool 3 partitions and no resize was recorded, then they refuse to start with one
line naming the command to run, exit 2 and consume nothing; ``status`` shows the queues
beyond the new size that still hold messages as stranded. After the named command the
workers of 3 run every message, each key in publish order.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from celery_partitioning import partition_for
from tests.apps.harness import Harness, keyed_events
from tests.support.ordering import check
from tests.support.procs import Processes

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_a_worker_with_another_size_than_the_recorded_one_refuses_to_start(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, 6, tmp_path, processes)
    # Given workers that ran the pool with 6 partitions, and were stopped
    warmup = [(f"Warm:{i}", 0, 1, None) for i in range(12)]
    h.publish(warmup, partitions=6)
    six = h.start_workers("six", "--processes", "1", partitions=6)
    h.wait_done(len(warmup), timeout=60, logs=["six"])
    h.processes.signal(six, signal.SIGTERM)
    assert six.wait(timeout=60) == 0, h.log_text("six")[-3000:]
    # and a backlog queued under 6
    backlog, counts = keyed_events(30, 120, ms=1, seed=11)
    h.publish(backlog, partitions=6)
    depths = Counter(partition_for(key, 6) for key, _s, _m, _g in backlog)
    assert any(depths[i] for i in (3, 4, 5))

    # When workers are started with 3 partitions and no resize recorded
    three = h.start_workers("three", partitions=3)
    code = three.wait(timeout=90)

    # Then they refuse with one line naming the fix, exit 2, and consumed nothing
    out = h.log_text("three")
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.strip()]
    fix = "celery -A tests.apps.ordering_app partitioning resize p 3 --from 6"
    assert len(errors) == 1 and errors[0].startswith("Error: pool 'p' is recorded with 6 "
                                                     "partitions but this worker runs it with 3")
    assert f"`{fix}`" in errors[0], errors[0]
    assert "[supervisor]" not in out
    assert h.done() == len(warmup)
    assert _depths(h, 6) == {i: depths[i] for i in range(6)}

    # And status shows the queues beyond the new size that hold messages as stranded
    status = h.cli("status", "--json", partitions=3)
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert [(s["index"], s["depth"]) for s in found["stranded"]] == [
        (i, depths[i]) for i in (3, 4, 5) if depths[i]]
    assert found["size_mismatches"] == [{"pool": "p", "recorded": 6, "configured": 3}]
    table = h.cli("status", partitions=3).stdout
    assert f"STRANDED {namespace}partition.p.3" in table or not depths[3]
    assert f"`{fix}`" in table

    # And once the named command ran, workers of 3 run everything, each key in order
    resized = h.cli("resize", "p", "3", "--from", "6", partitions=3)
    assert resized.returncode == 0, resized.stderr
    h.start_workers("after", "--processes", "1", partitions=3)
    h.wait_done(len(warmup) + len(backlog), timeout=120, logs=["after"])
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()


def _depths(h: Harness, partitions: int) -> dict[int, int]:
    client = h.redis
    return {i: int(client.llen(f"{h.ns}{h.ns}partition.p.{i}")) for i in range(partitions)}
