"""The ordering promise with real processes: SIGKILLed partition workers, Redis and RabbitMQ.

Given 4 partitions, 2,000 keyed events over 120 keys and `celery partitioning worker`,
when two partition workers are SIGKILLed while each is inside a task,
then every key ran in publish order, nothing was lost, the killed message of each ran
again *before* any later message of its key (crash recovery; no visibility timeout, which
stays at kombu's default hour), and no partition ever ran two tasks at once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from celery_partitioning import partition_for
from tests.apps.harness import (
    HOLD_MS,
    Harness,
    delete_amqp_queues,
    keyed_events,
    rerun_in_place,
)
from tests.support.ordering import check, concurrent_runs
from tests.support.procs import Processes

pytestmark = pytest.mark.integration

PARTITIONS = 4
KEYS = 120
EVENTS = 2000



def _slow_targets(events: list, partitions: int) -> list[tuple[str, int]]:
    """Two (key, seq) in different partitions, a third of the way in: made slow and signalled."""
    chosen: dict[int, tuple[str, int]] = {}
    for key, seq, _ms, _sig in events[len(events) // 3:]:
        index = partition_for(key, partitions)
        if index not in chosen and seq >= 3:
            chosen[index] = (key, seq)
        if len(chosen) == 2:
            break
    return list(chosen.values())


def _run_kill_scenario(h: Harness) -> None:
    events, counts = keyed_events(KEYS, EVENTS, ms=2)
    targets = _slow_targets(events, PARTITIONS)
    events = [(k, s, HOLD_MS, "slow") if (k, s) in targets else (k, s, ms, sig)
              for k, s, ms, sig in events]

    sup = h.start_workers("workers")
    h.publish(events)
    killed_pids: set[int] = set()
    killed: list[tuple[str, int]] = []
    started = time.monotonic()
    while len(killed) < 2:
        pid, _label, key, seq = h.next_signal("slow", timeout=90)
        if (key, seq) in killed:
            continue  # the re-run of a message we already killed: let it finish
        os.kill(pid, signal.SIGKILL)  # the partition worker, inside the slow task
        killed_pids.add(pid)
        killed.append((key, seq))

    h.wait_done(EVENTS, timeout=75, logs=["workers"])
    elapsed = time.monotonic() - started

    report = check(h.records(counts), counts)
    print(f"\n{h.broker.split(':')[0]}: {EVENTS} events, {KEYS} keys, {PARTITIONS} partitions, "
          f"2 SIGKILLs: {report.summary()}; all done {elapsed:.1f}s after publishing")
    assert report.ok, report.summary()
    for key, seq in killed:
        records = h.records([key])[key]
        assert rerun_in_place(records, seq), (
            f"killed message {key}#{seq} was not re-run before the key's later messages: {records}")
    assert report.reruns >= 2, report.summary()
    for index in range(PARTITIONS):
        problems = concurrent_runs(h.partition_log(f"p.{index}"), killed_pids)
        assert not problems, problems[:3]
    assert elapsed < 100  # far below kombu's visibility timeout (3600 s): recovery, not waiting
    assert h.log_text("workers").count("restarting in") >= 2

    h.processes.signal(sup, signal.SIGTERM)
    assert sup.wait(timeout=60) == 0, h.log_text("workers")[-3000:]


@pytest.mark.timeout(240)
def test_sigkilled_partition_workers_keep_per_key_order_on_redis(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, PARTITIONS, tmp_path, processes)
    _run_kill_scenario(h)
    # Nothing left behind: queues drained, nothing unacked for our queues.
    client = h.redis
    for index in range(PARTITIONS):
        assert client.llen(f"{namespace}{namespace}partition.p.{index}") == 0
    assert client.hlen(f"{namespace}unacked") == 0


@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
def test_sigkilled_partition_workers_keep_per_key_order_on_rabbitmq(
        amqp_url: str, redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    store = redis_url
    h = Harness(amqp_url, store, namespace, PARTITIONS, tmp_path, processes)
    queues = [f"{namespace}partition.p.{i}" for i in range(PARTITIONS)]
    try:
        _run_kill_scenario(h)
        # The partition queues were declared for a single active consumer: re-declaring one
        # without the argument is refused by the broker.
        from amqp.exceptions import PreconditionFailed
        from kombu import Connection

        with Connection(amqp_url) as conn, pytest.raises(PreconditionFailed,
                                                          match="x-single-active-consumer"):
            conn.channel().queue_declare(queue=queues[0], durable=True, auto_delete=False)
    finally:
        processes.kill_all()
        delete_amqp_queues(amqp_url, queues)
