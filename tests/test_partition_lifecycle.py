"""A partition is a unit with a life cycle: started and stopped, many times, in a running process.

The test process runs the partition in process (``InProcessWorker``) while a standby process
waits for its lease (``tests/apps/lifecycle_app.py``). Keyed messages keep arriving. The test
stops its partition (the standby takes over), starts it again (a standby itself now), and
takes it back when the other process stops its own unit in turn: several hand-overs both
ways. Every run is recorded (key, seq, process, start, end) and checked: every key in order,
nothing lost or run twice, and no two runs of the partition overlapping in time.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_partitioning.worker.inprocess import InProcessWorker
from tests.apps.lifecycle_app import log_key, make_app, runs_of
from tests.support.procs import Processes, alive, wait_for

pytestmark = pytest.mark.integration

#: Times the test process stops and starts its partition (each cycle hands it over twice).
CYCLES = 3
#: Messages each process runs while it holds the partition, before it hands it over.
RUNS = 15
KEYS = [f"Order:{i}" for i in range(6)]
#: The app's lease TTL: this process holds the partition longer than that each time, so a
#: lease that is not renewed after a restart would expire under it (and show as an overlap).
LEASE_TTL = 2.0


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.kill_all()


class Publisher(threading.Thread):
    """Publishes ``KEYS`` round robin, each with its next seq, until told to stop."""

    def __init__(self, app: object) -> None:
        super().__init__(name="lifecycle-publisher", daemon=True)
        self.task = app.tasks["lifecycle.step"]  # type: ignore[attr-defined]
        self.sent: dict[str, int] = defaultdict(int)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for key in KEYS:
                self.task.delay(key, self.sent[key])
                self.sent[key] += 1
            time.sleep(0.25)


def test_a_partition_stops_and_starts_again_and_again_with_a_standby_waiting(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    app = make_app(redis_url, namespace)
    me = os.getpid()
    with InProcessWorker(app, "entity") as worker:
        unit = worker.partition("entity", 0)
        assert unit.consuming
        # Given a standby process waiting for the partition's lease, and messages flowing
        standby = processes.start(
            [sys.executable, "-m", "tests.apps.lifecycle_app", redis_url, namespace, str(RUNS)],
            log=tmp_path / "standby.log")
        wait_for(lambda: client.exists(f"{namespace}lifecycle:ready"), 60, "the standby process")
        publisher = Publisher(app)
        publisher.start()
        try:
            held_since = time.monotonic()
            for cycle in range(CYCLES):
                # When this process has run some messages, longer than a lease TTL, it stops
                # its partition
                target = runs_of(client, namespace, me) + RUNS
                wait_for(lambda target=target, since=held_since: (
                    runs_of(client, namespace, me) >= target
                    and time.monotonic() - since > 2 * LEASE_TTL), 120,
                    f"cycle {cycle}: messages run here")
                assert unit.stop(timeout=30) and not unit.running
                # Then the standby takes over while it is stopped
                theirs = runs_of(client, namespace, standby.pid)
                wait_for(lambda theirs=theirs: runs_of(client, namespace, standby.pid) > theirs, 60,
                         f"cycle {cycle}: the standby taking over")
                # And started again it waits, and takes the partition back when the other
                # process hands it over in turn
                unit.start()
                wait_for(lambda: unit.consuming, 120, f"cycle {cycle}: the partition back here")
                held_since = time.monotonic()
        finally:
            publisher.halt.set()
            publisher.join(10)
        sent = sum(publisher.sent.values())
        wait_for(lambda: client.llen(log_key(namespace)) >= sent, 120, "every message run")
        client.set(f"{namespace}lifecycle:done", 1)
    wait_for(lambda: not alive(standby.pid), 60, "the standby process to end")
    # Then: every key in publish order, nothing lost, nothing run twice
    runs = [json.loads(raw) for raw in client.lrange(log_key(namespace), 0, -1)]
    by_key: dict[str, list[int]] = defaultdict(list)
    for key, seq, _pid, _started, _ended in runs:
        by_key[key].append(seq)
    assert {key: seqs for key, seqs in by_key.items()} == {
        key: list(range(publisher.sent[key])) for key in KEYS}
    # both processes ran the partition, and never at the same time
    assert {pid for *_, pid, _s, _e in runs} == {me, standby.pid}
    spans = sorted((started, ended, pid) for *_, pid, started, ended in runs)
    overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    assert overlaps == []
    # every stop handed the partition over, and every start took it back (the last one maybe
    # after the last message)
    handovers = sum(1 for a, b in itertools.pairwise(runs) if a[2] != b[2])
    assert handovers >= 2 * CYCLES - 1
