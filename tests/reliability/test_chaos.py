"""Chaos: random partition workers SIGKILLed every few seconds, and members joining and
leaving, while a keyed stream drains.

Given `celery partitioning worker` over P partitions and E events over K keys, one event in
ten retrying once after a 0.3 s backoff (its key set aside meanwhile),
when a loop SIGKILLs a random partition worker (preferably one inside a task) every few
seconds while events are published and drained, and between kills another `partitioning
worker` command joins (a balanced member: partitions move to it) and later leaves with SIGTERM
(they move back),
then no key ran out of order, nothing was lost, no key and no partition ever ran two tasks
at once, and the number of re-runs (messages a killed worker had started) is reported.

CI size: 2,000 events / 200 keys / 4 partitions / 6 kills 2.5 s apart.
`make soak` (CP_SOAK=1): 10,000 events / 500 keys / 8 partitions / 30 kills 3 s apart.
Knobs: CP_CHAOS_EVENTS, CP_CHAOS_KEYS, CP_CHAOS_PARTITIONS, CP_CHAOS_KILLS,
CP_CHAOS_INTERVAL_MS, CP_CHAOS_SEED, CP_CHAOS_TASK_MS (10 ms tasks).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from subprocess import Popen

import psutil
import pytest

from celery_partitioning.state import redis_keys
from celery_partitioning.store.membership import Membership
from tests.reliability.conftest import Workload, keyed_events, size
from tests.support.procs import wait_for

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


def is_member(w: Workload, command: Popen[bytes]) -> bool:
    """Whether a process of ``command`` is a live member of the pool."""
    pids = {child.pid for child in live_children(command.pid)}
    return any(m.pid in pids for m in Membership(w.redis, redis_keys(w.app)).live("p", prune=False))


def churn_step(w: Workload, number: int, joined: list[Popen[bytes]], churn: list[str]) -> None:
    """Membership churn: every third step another command joins; the step after, once its
    process is a member of the pool, it leaves warmly (SIGTERM, exit 0 expected)."""
    if number % 3 == 0:
        joined.append(w.start_workers(f"member{number}", processes=1))
        churn.append("join")
    elif number % 3 == 1 and joined:
        member = joined.pop()
        # Not before it joined: a SIGTERM that comes while the command still imports (a
        # loaded machine) ends it with -15, before it ever took part.
        wait_for(lambda: is_member(w, member), 60, "the new member to join the pool")
        member.send_signal(signal.SIGTERM)
        churn.append(f"leave {member.wait(timeout=60)}")


def test_random_sigkills_keep_every_key_in_order(workload_factory: Callable[..., Workload],
                                                 say: Callable[[str], None]) -> None:
    events_total = size("CHAOS_EVENTS", 2000, 10_000)
    keys = size("CHAOS_KEYS", 200, 500)
    partitions = size("CHAOS_PARTITIONS", 4, 8)
    kills = size("CHAOS_KILLS", 6, 30)
    interval = size("CHAOS_INTERVAL_MS", 2500, 3000) / 1000
    seed = size("CHAOS_SEED", 11, 11)
    rng = random.Random(seed)

    w = workload_factory(partitions, ms=size("CHAOS_TASK_MS", 10, 10))
    events, counts = keyed_events(keys, events_total, seed)
    retried = {event for i, event in enumerate(events) if i % 10 == 7}

    def publish(part: list[tuple[str, int]]) -> None:
        w.publish(part, retried, fails=1, countdown=0.3)

    supervisor = w.start_workers()
    # A third of the stream now; the rest in one chunk after each kill, so that there is
    # always work in flight when a worker dies, however fast the machine.
    head = len(events) // 3
    publish(events[:head])
    rest = events[head:]
    chunks = [rest[i * len(rest) // kills:(i + 1) * len(rest) // kills] for i in range(kills)]
    wait_for(lambda: w.done() > 0, 120, "the workers to start running tasks")

    killed: set[int] = set()
    busy_kills = 0
    churn: list[str] = []
    joined: list[Popen[bytes]] = []
    started = time.monotonic()
    for number, chunk in enumerate(chunks):
        time.sleep(interval)
        churn_step(w, number, joined, churn)
        # A worker process to kill (one killed just before may still be restarting: wait for it)
        wait_for(lambda: bool(live_children(supervisor.pid)), 60, "a live worker process")
        children = live_children(supervisor.pid)
        busy = w.busy_pids()
        # Prefer a worker that is inside a task right now: that is the hard case.
        candidates = [c for c in children if c.pid in busy] or children
        if candidates:
            victim = rng.choice(candidates)
            try:
                os.kill(victim.pid, signal.SIGKILL)
                killed.add(victim.pid)
                busy_kills += victim.pid in busy
            except ProcessLookupError:
                pass
        publish(chunk)
    for member in joined:
        wait_for(lambda m=member: is_member(w, m), 60, "the new member to join the pool")  # type: ignore[misc]
        member.send_signal(signal.SIGTERM)
        churn.append(f"leave {member.wait(timeout=60)}")
    w.wait_done(events_total, timeout=300 if os.environ.get("CP_SOAK") else 90, counts=counts)
    elapsed = time.monotonic() - started

    report = w.report(counts)
    overlaps = w.partition_overlaps(killed)
    say(f"chaos: {events_total} events ({len(retried)} retried after a backoff), {keys} keys, "
        f"{partitions} partitions, {len(killed)} SIGKILLs "
        f"({busy_kills} inside a task), members {', '.join(churn)}, {report.reruns} re-runs, "
        f"{elapsed:.1f}s; {report.summary()}")
    assert len(killed) >= kills - 1, f"only {len(killed)} of {kills} kills happened: the test proved little"
    assert churn.count("join") >= 2 and all(c in ("join", "leave 0") for c in churn), churn
    assert report.ok, report.summary() + "\n--- worker log\n" + w.log_tail()
    assert not overlaps, overlaps[:5]
    supervisor.send_signal(signal.SIGTERM)
