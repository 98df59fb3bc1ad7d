"""RabbitMQ connection drop: the broker closes the workers' connections mid-run; nothing lost or reordered.

Given `celery partitioning worker` over 4 partitions on RabbitMQ (single-active-consumer
queues; leases and records in Redis) and a keyed stream,
when RabbitMQ force-closes every connection of our partition workers (``rabbitmqctl
close_connection``, only ours: the broker is shared) twice while the stream drains,
then every event ran, every key in publish order, and no partition ran two tasks at once.
Knobs: CP_AMQP_DROP_EVENTS (CI 800; soak 4,000), CP_AMQP_DROP_KEYS (80; 300).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable

import psutil
import pytest

from tests.reliability.conftest import Workload, keyed_events, size
from tests.support.env import missing
from tests.support.procs import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


def worker_ports(supervisor_pid: int, amqp_port: int = 5672) -> set[int]:
    """Local ports of the partition workers' connections to RabbitMQ."""
    ports = set()
    for child in psutil.Process(supervisor_pid).children(recursive=True):
        try:
            for conn in child.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == amqp_port:
                    ports.add(conn.laddr.port)
        except psutil.Error:
            pass
    return ports


def close_connections(ports: set[int]) -> int:
    """Close the RabbitMQ connections whose peer port is one of ``ports``; how many were closed."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"],
                            capture_output=True, text=True, timeout=60, check=True)
    closed = 0
    for line in listed.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) in ports:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", parts[0], "reliability test drop"],
                           capture_output=True, text=True, timeout=60, check=True)
            closed += 1
    return closed


def delete_queues(url: str, names: list[str]) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in names:
            try:
                channel.queue_delete(name)
            except Exception:  # already gone, or the channel closed: open another
                channel = conn.channel()
        channel.close()


def test_rabbitmq_closing_worker_connections_loses_and_reorders_nothing(
        amqp_url: str, workload_factory: Callable[..., Workload], say: Callable[[str], None]) -> None:
    if shutil.which("rabbitmqctl") is None:
        missing("rabbitmqctl is not on PATH: cannot drop connections")
    events_total = size("AMQP_DROP_EVENTS", 800, 4000)
    keys = size("AMQP_DROP_KEYS", 80, 300)
    w = workload_factory(4, broker=amqp_url, ms=5)
    w.store = w.records  # leases and dead letters in Redis (the broker is RabbitMQ)
    queues = [f"{w.ns}partition.p.{i}" for i in range(4)]
    events, counts = keyed_events(keys, events_total, seed=9)
    try:
        supervisor = w.start_workers()
        w.publish(events[: events_total // 2])
        drops = []
        for fraction in (0.15, 0.55):
            wait_for(lambda f=fraction: w.done() >= int(events_total * f), 120,  # type: ignore[misc]
                     f"{fraction:.0%} of the events to run")
            ports = worker_ports(supervisor.pid)
            drops.append(close_connections(ports))
            if fraction == 0.15:
                w.publish(events[events_total // 2:])
        w.wait_done(events_total, timeout=120)
        report = w.report(counts)
        overlaps = w.partition_overlaps(killed=set())
        say(f"rabbitmq drop: {events_total} events, {keys} keys, connections closed {drops}; "
            f"{report.summary()}")
        assert sum(drops) >= 2, f"no worker connection was closed ({drops}): the test proved little"
        assert report.ok, report.summary() + "\n--- worker log\n" + w.log_tail()
        assert not overlaps, overlaps[:5]
        supervisor.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    finally:
        w.processes.kill_all()
        delete_queues(amqp_url, queues)
