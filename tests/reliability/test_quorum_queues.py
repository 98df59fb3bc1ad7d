"""RabbitMQ quorum queues: partition queues follow ``task_default_queue_type``, order survives crashes.

Given ``task_default_queue_type = "quorum"`` and `celery partitioning worker` over 4 partitions
on RabbitMQ (leases are the queues' single active consumer; dead letters and attempt records in
Redis), and a keyed stream where every 8th message fails twice and is retried in place,
when busy partition workers are SIGKILLed three times while the stream drains,
then every partition queue is a quorum queue with ``x-single-active-consumer`` and an explicit
``x-delivery-limit``; every event ran, every key in publish order, no partition ran two tasks
at once; and an in-place retry never cost a delivery (every attempt of a retried message that
no kill touched saw the same ``x-delivery-count``), while a crash costs exactly one and the
message runs again first.

Also: a partition queue that exists with another type stops ``celery partitioning worker`` at
start with one line saying how to migrate, and a setup without a guarantee is refused at start
(one line, exit 2) unless ``partitioning_allow_degraded`` is set.
Knobs: CP_QUORUM_EVENTS (CI 1,200; soak 5,000), CP_QUORUM_KEYS (120; 300).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from celery_partitioning.config import DEFAULT_DELIVERY_LIMIT
from celery_partitioning.store.keys import key_digest
from tests.apps.harness import delete_amqp_queues
from tests.reliability.conftest import Workload, keyed_events, size
from tests.reliability.test_chaos import live_children
from tests.support.env import missing
from tests.support.procs import ROOT, celery_bin, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


def rabbit_queues(names: Iterable[str]) -> dict[str, dict[str, object]]:
    """``rabbitmqctl list_queues`` facts (type, arguments, messages) of the named queues."""
    if shutil.which("rabbitmqctl") is None:
        missing("rabbitmqctl is not on PATH")
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "type", "arguments",
                             "messages", "--formatter", "json"],
                            capture_output=True, text=True, timeout=60, check=True)
    wanted = set(names)
    return {q["name"]: {"type": q["type"], "messages": q["messages"],
                        "arguments": {a[0]: a[2] for a in q["arguments"]}}
            for q in json.loads(listed.stdout) if q["name"] in wanted}


@pytest.mark.timeout(240)
def test_quorum_partition_queues_keep_order_through_sigkills_and_in_place_retries(
        workload_factory: Callable[..., Workload], amqp_url: str, records_url: str,
        say: Callable[[str], None]) -> None:
    events_total = size("QUORUM_EVENTS", 1200, 5000)
    keys = size("QUORUM_KEYS", 120, 300)
    w = workload_factory(4, broker=amqp_url, store=records_url, ms=10,
                         conf={"task_default_queue_type": "quorum"})
    queues = [f"{w.ns}partition.p.{i}" for i in range(w.partitions)]
    events, counts = keyed_events(keys, events_total, seed=8)
    flaky = {event for i, event in enumerate(events) if i % 8 == 3}
    try:
        processes = 2
        supervisor = w.start_workers(processes=processes)
        head = len(events) // 3
        w.publish(events[:head], flaky)
        wait_for(lambda: w.done() > 0, 120, "the workers to start running tasks")
        rest = events[head:]
        kills = 3
        chunks = [rest[i * len(rest) // kills:(i + 1) * len(rest) // kills] for i in range(kills)]
        killed: set[int] = set()
        victims: list[Any] = []

        def inside_a_task() -> bool:
            busy = w.busy_pids()
            victims[:] = [c for c in live_children(supervisor.pid)
                          if c.pid in busy and c.pid not in killed]
            return bool(victims)

        for chunk in chunks:
            w.publish(chunk, flaky)
            # a worker process inside a task (the previous victim's successor may still start)
            wait_for(inside_a_task, 60, "a worker process inside a task", interval=0.01)
            os.kill(victims[0].pid, signal.SIGKILL)
            killed.add(victims[0].pid)
        w.wait_done(events_total, timeout=120, counts=counts)

        # (queue statistics of quorum queues lag by a few seconds; a listing takes a second)
        facts: dict[str, dict[str, object]] = {}

        def emptied() -> bool:
            facts.clear()
            facts.update(rabbit_queues(queues))
            return all(q["messages"] == 0 for q in facts.values())

        wait_for(emptied, 30, "the partition queues to be empty", interval=0.2)
        report = w.report(counts)
        overlaps = w.partition_overlaps(killed)
        attempts: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for raw in w.redis.lrange(f"{w.ns}attempts", 0, -1):
            digest, seq, attempt, deliveries = raw.decode().split(" ")
            attempts.setdefault((digest, seq), []).append((int(attempt), int(deliveries)))
        retried_in_place = [runs for runs in attempts.values()
                            if len(runs) >= 3 and len({d for _a, d in runs}) == 1]
        max_deliveries = max((d for runs in attempts.values() for _a, d in runs), default=0)
        say(f"quorum queues: {events_total} events, {keys} keys, {len(flaky)} retried twice in "
            f"place, {len(killed)} SIGKILLs; {len(retried_in_place)} retried messages ran 3 "
            f"attempts in one delivery; highest x-delivery-count seen {max_deliveries}; "
            f"{report.summary()}")
        assert len(killed) >= 2, "fewer than two kills landed inside a task: the test proved little"
        assert report.ok, report.summary() + "\n--- worker log\n" + w.log_tail()
        assert not overlaps, overlaps[:5]
        for name in queues:
            assert facts[name]["type"] == "quorum", facts[name]
            assert facts[name]["arguments"] == {"x-queue-type": "quorum",
                                                "x-single-active-consumer": True,
                                                "x-delivery-limit": DEFAULT_DELIVERY_LIMIT}
            assert facts[name]["messages"] == 0, facts[name]
        # In-place retries run again inside the same delivery: only a kill redelivers, and a
        # kill redelivers at most one message of each partition the killed process hosted.
        flaky_digests = {(key_digest(k), str(s)) for k, s in flaky}
        assert set(attempts) == flaky_digests
        per_process = -(-w.partitions // processes)
        assert len(retried_in_place) >= len(flaky) - len(killed) * per_process, (
            "a retried message was redelivered without a kill", attempts)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, w.log_tail()
    finally:
        w.processes.kill_all()
        delete_amqp_queues(amqp_url, queues)


@pytest.mark.timeout(120)
def test_a_crash_redelivery_counts_one_delivery_and_runs_first(
        workload_factory: Callable[..., Workload], amqp_url: str, records_url: str) -> None:
    # Given one quorum partition whose first message fails twice (retried in place), then holds
    # its worker for 3 s on its third attempt; 20 more messages behind it
    w = workload_factory(1, broker=amqp_url, store=records_url, ms=3000,
                         conf={"partitioning_queue_type": "quorum"})
    queues = [f"{w.ns}partition.p.0"]
    events = [("Order:held", 0)] + [("Order:held", seq) for seq in range(1, 11)] + [
        ("Order:other", seq) for seq in range(10)]
    counts = {"Order:held": 11, "Order:other": 10}
    try:
        supervisor = w.start_workers()
        w.publish(events[:1], set(events[:1]))
        w.ms = 1
        w.publish(events[1:])
        wait_for(lambda: int(w.redis.llen(f"{w.ns}attempts")) >= 3 and bool(w.busy_pids()), 60,
                 "the held message's third attempt to start")
        # When its worker is SIGKILLed inside it
        victim = next(iter(w.busy_pids()))
        os.kill(victim, signal.SIGKILL)
        w.wait_done(len(events), timeout=60, counts=counts)
        # Then the in-place retries cost no delivery, the crash cost one: RabbitMQ returned the
        # message to the head and it ran again (and succeeded) before anything behind it
        runs = [raw.decode().split(" ")[2:] for raw in w.redis.lrange(f"{w.ns}attempts", 0, -1)]
        assert runs == [["1", "0"], ["2", "0"], ["3", "0"], ["4", "1"]], runs
        report = w.report(counts)
        assert report.ok and report.reruns == 3, report.summary()
        assert not w.partition_overlaps({victim})
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, w.log_tail()
    finally:
        w.processes.kill_all()
        delete_amqp_queues(amqp_url, queues)


def run_worker_command(w: Workload, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([celery_bin(), "-A", "tests.apps.reliability_app", "partitioning", "worker",
                           "-l", "warning"],
                          env={**os.environ, "PYTHONPATH": str(ROOT), **w.env()}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def test_a_partition_queue_of_another_type_stops_the_start_with_the_migration(
        workload_factory: Callable[..., Workload], amqp_url: str, records_url: str) -> None:
    # Given partition queue 0 declared as a classic queue by an earlier deployment
    from kombu import Connection, Exchange, Queue

    w = workload_factory(2, broker=amqp_url, store=records_url,
                         conf={"partitioning_queue_type": "quorum"})
    queues = [f"{w.ns}partition.p.{i}" for i in range(w.partitions)]
    try:
        with Connection(amqp_url) as conn:
            Queue(queues[0], Exchange("celery", type="direct"), queues[0],
                  queue_arguments={"x-single-active-consumer": True}).bind(conn.channel()).declare()
        # When the workers start with partitioning_queue_type = "quorum"
        done = run_worker_command(w)
        # Then the command stops at once, non-zero, with one line naming the fix
        assert done.returncode == 2, done.stdout + done.stderr
        lines = error_lines(done.stderr)
        assert len(lines) == 1, done.stderr
        assert queues[0] in lines[0] and "x-queue-type" in lines[0], lines[0]
        assert "partitioning_queue_type" in lines[0] and "delete it" in lines[0], lines[0]
        assert "[supervisor]" not in done.stdout  # no partition worker was started
        assert rabbit_queues(queues)[queues[0]]["type"] == "classic"  # nothing changed
    finally:
        delete_amqp_queues(amqp_url, queues)


@pytest.mark.parametrize(("conf", "store", "setting"), [
    pytest.param({}, None, "partitioning_redis_url", id="rabbitmq-without-a-store"),
    pytest.param({"broker_url": "sentinel://127.0.0.1:1"}, "", "broker_transport_options",
                 id="sentinel-without-master-name"),
])
def test_a_setup_without_a_guarantee_is_refused_at_start(
        workload_factory: Callable[..., Workload], amqp_url: str, records_url: str,
        conf: dict[str, object], store: str | None, setting: str) -> None:
    w = workload_factory(2, broker=amqp_url, store=store, conf=conf)
    done = run_worker_command(w)
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert setting in lines[0], lines[0]
    assert "[supervisor]" not in done.stdout


def test_the_opt_out_starts_with_a_warning(workload_factory: Callable[..., Workload],
                                           amqp_url: str) -> None:
    w = workload_factory(1, broker=amqp_url, store=None, conf={"partitioning_allow_degraded": True})
    queues = [f"{w.ns}partition.p.0"]
    try:
        supervisor = w.start_workers()
        wait_for(lambda: "p.0 runs WITHOUT a guarantee" in w.log_tail(chars=10**6), 60,
                 "the partition worker to start and say what it runs without")
        text = w.log_tail(chars=10**6)
        assert "Warning: running without a guarantee" in text, text  # the command says it too
        assert "partitioning_redis_url" in text, text
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, w.log_tail()
    finally:
        w.processes.kill_all()
        delete_amqp_queues(amqp_url, queues)
