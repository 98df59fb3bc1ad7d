"""Parking and replay on RabbitMQ (dead-letter store on Redis), real workers.

RabbitMQ cannot take a message back at the head of a queue, so a replay publishes the
messages to the back; a newer message of the key that sits ahead of them must wait.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis

from tests.support.failures import env_of, start_partition_worker
from tests.support.ordering import check
from tests.support.procs import ROOT, Processes, celery_bin, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


@pytest.fixture
def fa(redis_url: str, amqp_url: str, namespace: str,
       monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    url = redis_url
    monkeypatch.setenv("CP_REDIS_URL", url)
    monkeypatch.setenv("CP_BROKER_URL", amqp_url)
    monkeypatch.setenv("CP_NS", namespace)
    module = importlib.reload(importlib.import_module("tests.apps.failures_app"))
    assert amqp_url == module.BROKER_URL
    yield module
    with module.app.connection_for_write() as conn:
        channel = conn.default_channel
        for pool, count in (("entity", 2), ("dcb", 2)):
            for index in range(count):
                channel.queue_delete(f"{namespace}partition.{pool}.{index}")
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"*{namespace}*", count=1000):
        client.delete(key)


def test_on_rabbitmq_a_replay_runs_before_a_newer_message_already_queued(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    from celery_partitioning.store.keys import RedisKeys

    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    first = fa.cp.explain_route(fa.app, "fail.step", "p0", 0).index
    p, q = [o for o in (f"p{i}" for i in range(500))
            if fa.cp.explain_route(fa.app, "fail.step", o, 0).index == first][:2]
    key = f"Order:{p}"
    parked = RedisKeys(fa.NS).parked("entity", key)
    # Given P parked behind a poison P0 (P1, P2 parked), Q on the same partition done
    client.set(f"{fa.NS}poison:{p}:0", "bad")
    for seq in range(3):
        fa.step.delay(p, seq)
    fa.step.delay(q, 0)
    worker = start_partition_worker(processes, fa, "entity", first, tmp_path / "w1.log")
    wait_for(lambda: client.llen(parked) == 2 and client.llen(f"{fa.NS}rec:Order:{q}") == 2, 60,
             "P1, P2 parked and Q0 done")
    processes.signal(worker, signal.SIGTERM)
    worker.wait(timeout=30)
    # And P3 published while no worker runs: it waits in the queue, ahead of any replay
    fa.step.delay(p, 3)
    client.delete(f"{fa.NS}poison:{p}:0")
    # When the key is replayed and a worker starts
    out = subprocess.run(
        [celery_bin(), "-A", "tests.apps.failures_app", "partitioning", "dead-letters", "replay",
         "--key", key], env={**os.environ, "PYTHONPATH": str(ROOT), **env_of(fa)}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "replayed 3 message(s)" in out.stdout, out.stdout + out.stderr
    start_partition_worker(processes, fa, "entity", first, tmp_path / "w2.log")
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 3"], 60, "P3 to run")
    fa.step.delay(p, 4)
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 4"], 30, "P4 to run")
    # Then P ran 0..4 in publish order: P3 was deferred behind the replayed messages
    report = check({key: client.lrange(f"{fa.NS}rec:{key}", 0, -1)}, {key: 5})
    assert report.ok and report.reruns == 1, report.summary()
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"{key} 0", f"Order:{q} 0", f"{key} 0", f"{key} 1", f"{key} 2", f"{key} 3", f"{key} 4"]


def test_on_rabbitmq_a_key_in_retry_backoff_waits_alone_and_keeps_its_order(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    first = fa.cp.explain_route(fa.app, "fail.flaky", "r0", 0).index
    a, *others = [o for o in (f"r{i}" for i in range(500))
                  if fa.cp.explain_route(fa.app, "fail.flaky", o, 0).index == first][:6]
    # Given A0 fails twice (0.3 s countdown), then 25 events of 5 other keys, then A1 and A2:
    # A1 reaches the worker either during the backoff (set aside) or ahead of the released A0
    # (republished to the back of the queue): then it is deferred behind it
    fa.flaky.delay(a, 0, 2, 0.3)
    for seq in range(5):
        for order in others:
            fa.flaky.delay(order, seq)
    fa.flaky.delay(a, 1)
    fa.flaky.delay(a, 2)
    start_partition_worker(processes, fa, "entity", first, tmp_path / "w.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 30, 60, "30 runs")
    # Then every key ran in order, A0 three times before A1
    keys = [f"Order:{o}" for o in (a, *others)]
    records = {k: client.lrange(f"{fa.NS}rec:{k}", 0, -1) for k in keys}
    report = check(records, {k: 3 if k == f"Order:{a}" else 5 for k in keys})
    assert report.ok and report.reruns == 2, report.summary()
    ran = client.lrange(f"{fa.NS}ran", 0, -1)
    assert [r for r in ran if r.startswith(f"Order:{a} ")] == [
        f"Order:{a} 0 try0", f"Order:{a} 0 try1", f"Order:{a} 0 try2", f"Order:{a} 1 try0",
        f"Order:{a} 2 try0"]


def test_on_rabbitmq_skip_runs_the_parked_messages_before_a_newer_one_already_queued(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    from celery_partitioning.store.keys import RedisKeys

    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    first = fa.cp.explain_route(fa.app, "fail.step", "p0", 0).index
    p, q = [o for o in (f"p{i}" for i in range(500))
            if fa.cp.explain_route(fa.app, "fail.step", o, 0).index == first][:2]
    key = f"Order:{p}"
    parked = RedisKeys(fa.NS).parked("entity", key)
    # Given P parked behind a poison P0 with four good messages P1-P4, Q done
    client.set(f"{fa.NS}poison:{p}:0", "malformed event")
    ids = [fa.step.delay(p, seq).id for seq in range(5)]
    fa.step.delay(q, 0)
    worker = start_partition_worker(processes, fa, "entity", first, tmp_path / "w1.log")
    wait_for(lambda: client.llen(parked) == 4 and client.llen(f"{fa.NS}rec:Order:{q}") == 2, 60,
             "P1-P4 parked and Q0 done")
    processes.signal(worker, signal.SIGTERM)
    worker.wait(timeout=30)
    # And P5 published while no worker runs: it sits in the queue ahead of what skip publishes
    fa.step.delay(p, 5)
    # When the failed message is skipped (the fault not fixed) and a worker starts
    out = subprocess.run(
        [celery_bin(), "-A", "tests.apps.failures_app", "partitioning", "dead-letters", "skip",
         "--key", key, "--json"], env={**os.environ, "PYTHONPATH": str(ROOT), **env_of(fa)},
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    result = json.loads(out.stdout)
    assert (result["skipped"]["id"], result["via"]) == (ids[0], "publish")
    assert [m["id"] for m in result["messages"]] == ids[1:]
    start_partition_worker(processes, fa, "entity", first, tmp_path / "w2.log")
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 5"], 60, "P5 to run")
    fa.step.delay(p, 6)
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 6"], 30, "P6 to run")
    # Then P0 never ran again; P1-P4 ran in order, P5 deferred behind them, then P6
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"{key} 0", f"Order:{q} 0", *[f"{key} {seq}" for seq in range(1, 7)]]
    assert client.lrange(f"{fa.NS}rec:{key}", 0, -1) == ["start 0", *[
        f"{kind} {seq}" for seq in range(1, 7) for kind in ("start", "end")]]


def test_on_rabbitmq_a_paused_key_waits_and_resume_publishes_its_messages_in_order(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    from tests.test_pause_integration import key_pause_keeps_order

    key_pause_keeps_order(fa, processes, tmp_path)
