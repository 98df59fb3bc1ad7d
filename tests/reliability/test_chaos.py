"""Chaos: random partition workers SIGKILLed every few seconds while a keyed stream drains.

Given `celery partitioning worker` over P partitions and E events over K keys,
when a loop SIGKILLs a random partition worker (preferably one inside a task) every few seconds while events are published
and drained,
then no key ran out of order, nothing was lost, no key and no partition ever ran two tasks
at once, and the number of re-runs (messages a killed worker had started) is reported.

CI size: 2,000 events / 200 keys / 4 partitions / a kill every 2.5 s (at most 6 kills).
`make soak` (CP_SOAK=1): 10,000 events / 500 keys / 8 partitions / a kill every 3 s until
drained. Knobs: CP_CHAOS_EVENTS, CP_CHAOS_KEYS, CP_CHAOS_PARTITIONS, CP_CHAOS_MAX_KILLS,
CP_CHAOS_INTERVAL_MS, CP_CHAOS_SEED, CP_CHAOS_TASK_MS (10 ms tasks).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable

import psutil
import pytest

from tests.reliability.conftest import Workload, keyed_events, size

pytestmark = pytest.mark.integration


def live_children(supervisor_pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(supervisor_pid).children()
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_random_sigkills_keep_every_key_in_order(workload_factory: Callable[..., Workload],
                                                 say: Callable[[str], None]) -> None:
    events_total = size("CHAOS_EVENTS", 2000, 10_000)
    keys = size("CHAOS_KEYS", 200, 500)
    partitions = size("CHAOS_PARTITIONS", 4, 8)
    max_kills = size("CHAOS_MAX_KILLS", 6, 1_000_000)
    interval = size("CHAOS_INTERVAL_MS", 2500, 3000) / 1000
    seed = size("CHAOS_SEED", 11, 11)
    rng = random.Random(seed)

    w = workload_factory(partitions, ms=size("CHAOS_TASK_MS", 10, 10))
    events, counts = keyed_events(keys, events_total, seed)
    supervisor = w.start_workers()
    # A first part of the stream now, the rest while workers are being killed.
    head = len(events) // 3
    w.publish(events[:head])
    rest = events[head:]
    chunk = max(1, len(rest) // 8)

    killed: set[int] = set()
    started = time.monotonic()
    deadline = started + (60 if not os.environ.get("CP_SOAK") else 900)
    next_kill = started + interval
    while (rest or w.done() < events_total) and time.monotonic() < deadline:
        if rest:
            w.publish(rest[:chunk])
            rest = rest[chunk:]
        if time.monotonic() >= next_kill and len(killed) < max_kills and w.done() > 0:
            children = live_children(supervisor.pid)
            busy = w.busy_pids()
            # Prefer a worker that is inside a task right now: that is the hard case.
            candidates = [c for c in children if c.pid in busy] or children
            if candidates:
                victim = rng.choice(candidates)
                try:
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.add(victim.pid)
                except ProcessLookupError:
                    pass
            next_kill = time.monotonic() + interval
        if not rest and len(killed) >= max_kills:
            break
        time.sleep(0.1)
    assert not rest, "publishing did not finish in time"
    w.wait_done(events_total, timeout=max(10.0, deadline - time.monotonic()) + 30)
    elapsed = time.monotonic() - started

    report = w.report(counts)
    overlaps = w.partition_overlaps(killed)
    say(f"chaos: {events_total} events, {keys} keys, {partitions} partitions, {len(killed)} SIGKILLs, "
        f"{report.reruns} re-runs, drained in {elapsed:.1f}s; {report.summary()}")
    assert len(killed) >= min(3, max_kills), f"only {len(killed)} kills happened: the test proved little"
    assert report.ok, report.summary() + "\n--- worker log\n" + w.log_tail()
    assert not overlaps, overlaps[:5]
    supervisor.send_signal(signal.SIGTERM)
