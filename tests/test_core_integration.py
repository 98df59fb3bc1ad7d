"""Core, end to end: a real `celery worker` on one partition queue, and start-up validation."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest
import redis

from tests.support.ordering import check
from tests.support.procs import Processes, celery_bin, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = "CELERY_PARTITIONING_PARTITIONS"
ALLOW_PLAIN = "CELERY_PARTITIONING_ALLOW_PLAIN_CONSUMER"


def worker_argv(queue: str) -> list[str]:
    return [celery_bin(), "-A", "tests.apps.core_app", "worker", "-Q", queue, "-P", "solo", "-c", "1",
            "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"core-{uuid.uuid4().hex[:6]}@%h", "-l", "info"]


@pytest.fixture
def core_app(redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh import of tests/apps/core_app configured for this test's namespace."""
    monkeypatch.setenv("CP_REDIS_URL", redis_url)
    monkeypatch.setenv("CP_NS", namespace)
    sys.modules.pop("tests.apps.core_app", None)
    return importlib.import_module("tests.apps.core_app")


def test_one_worker_on_one_partition_runs_its_messages_in_publish_order(
    redis_url: str, namespace: str, processes: Processes, tmp_path: Path, core_app: ModuleType,
) -> None:
    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    # Given 400 events over 40 orders, two task types, published before any worker runs
    published: list[str] = []
    per_key: dict[str, int] = {}
    for i in range(400):
        order = f"ord-{i % 40}"
        seq = per_key.get(order, 0)
        per_key[order] = seq + 1
        task = core_app.item_added if i % 3 else core_app.item_removed
        result = task.apply_async((order, seq))
        published.append(f"Order:{order} {seq}")
        assert result.id
    route0 = {f"Order:{o}" for o in per_key if core_app.cp.explain_route(
        core_app.app, "core.item_added", o, 0).index == 0}
    assert 0 < len(route0) < 40  # both partitions have keys
    queue1 = f"{namespace}partition.entity.1"
    expected0 = [p for p in published if p.split(" ")[0] in route0]

    # When one real partition worker consumes partition 0 only
    proc = processes.start(worker_argv(f"{namespace}partition.idle"),
                           env={**env, PARTITIONS: "entity:0"},
                           log=tmp_path / "worker.log")
    wait_for(lambda: client.llen(f"{namespace}ran") >= len(expected0), 60,
             f"{len(expected0)} messages of partition 0 to run")
    processes.signal(proc, 15)
    proc.wait(timeout=30)

    # Then it ran exactly its queue's messages, in publish order, one at a time
    ran = client.lrange(f"{namespace}ran", 0, -1)
    assert ran == expected0
    records = {k: client.lrange(f"{namespace}rec:{k}", 0, -1) for k in route0}
    report = check(records, {k: per_key[k.split(":", 1)[1]] for k in route0})
    assert report.ok, report.summary()
    # and partition 1's messages are untouched, still queued
    assert client.llen(f"{namespace}{queue1}") == 400 - len(expected0)


def test_a_worker_with_an_invalid_registry_exits_before_consuming(
    redis_url: str, namespace: str, processes: Processes
) -> None:
    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace, "CP_INVALID": "1", ALLOW_PLAIN: "1"}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = f"{namespace}partition.entity.0"
    # Given a message waiting on the partition (published by a valid producer)
    code = ("import tests.apps.core_app as m; "
            "m.item_added.apply_async(('ord-x', 0))")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "CP_INVALID": "0"},
                   check=True, timeout=60)
    depth = client.llen(f"{namespace}{queue}") + client.llen(f"{namespace}{namespace}partition.entity.1")
    assert depth == 1
    # When a worker whose registry is invalid starts
    proc = subprocess.run(worker_argv(queue), env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    # Then it exits non-zero, naming every offender, and consumed nothing
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "core.broken_projection" in output and "has no partition key" in output
    assert "core.wrong_pool" in output and "unknown pool 'nowhere'" in output
    # printed once (logged at finalize; the exit line only refers to it)
    assert output.count("unknown pool 'nowhere'") == 1, output
    assert "refusing to start the worker: 3 partitioning problem(s) in the task registry " \
        "(listed above)" in proc.stderr
    assert client.llen(f"{namespace}ran") == 0
    assert client.llen(f"{namespace}{queue}") + client.llen(
        f"{namespace}{namespace}partition.entity.1") == 1


def test_canvas_links_published_by_the_worker_are_routed_by_key(
    redis_url: str, namespace: str, processes: Processes, tmp_path: Path, core_app: ModuleType,
) -> None:
    from celery import chain, chord

    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    queues = [f"{namespace}partition.entity.0", f"{namespace}partition.entity.1",
              f"{namespace}partition.global.0"]
    # Given one plain worker on every partition queue (routing is under test, not exclusivity)
    argv = worker_argv(",".join(queues))
    processes.start(argv, env={**env, ALLOW_PLAIN: "1"}, log=tmp_path / "worker.log")
    # When a chain hops across orders and a chord fans in to the global rollup
    orders = [f"ord-{i}" for i in range(6)]
    chain(*(core_app.link.si(order_id=o, step=i) for i, o in enumerate(orders))).apply_async()
    chord([core_app.link.si(order_id=o, step=10 + i) for i, o in enumerate(orders)],
          core_app.rollup.s()).apply_async()
    wait_for(lambda: client.llen(f"{namespace}links") >= 13, 90, "the chain, the chord and its body")
    # Then every link, including those the worker published, ran on its key's partition
    seen = [line.split(" ") for line in client.lrange(f"{namespace}links", 0, -1)]
    for order, _step, queue, key in (s for s in seen if s[0] != "rollup"):
        route = core_app.cp.explain_route(core_app.app, "core.link", order_id=order)
        assert (queue, key) == (route.queue, f"Order:{order}")
    chain_steps = [int(s[1]) for s in seen if s[0] != "rollup" and int(s[1]) < 10]
    assert chain_steps == list(range(6))
    rollups = [s for s in seen if s[0] == "rollup"]
    assert rollups == [["rollup", "6", f"{namespace}partition.global.0", "global"]]


def test_a_plain_worker_without_queues_never_consumes_partition_queues(
    redis_url: str, namespace: str, processes: Processes, tmp_path: Path, core_app: ModuleType,
) -> None:
    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    # Given partitioned messages waiting, then plain ones behind them
    for i in range(20):
        core_app.item_added.apply_async((f"ord-{i}", 0))
    for i in range(5):
        core_app.plain.delay(i)
    depths = {q: client.llen(f"{namespace}{namespace}partition.entity.{q}") for q in (0, 1)}
    assert sum(depths.values()) == 20
    # When a plain `celery worker` (no -Q: the app's default queues) runs until the plain tasks are done
    argv = [a for a in worker_argv("x") if a not in ("-Q", "x")]
    processes.start(argv, env=env, log=tmp_path / "plain.log")
    wait_for(lambda: client.llen(f"{namespace}plain") == 5, 60, "the plain tasks to run")
    # Then it ran none of the partitioned messages: partition queues are not in task_queues
    assert client.llen(f"{namespace}ran") == 0
    assert {q: client.llen(f"{namespace}{namespace}partition.entity.{q}") for q in (0, 1)} == depths


def test_a_plain_worker_asked_for_a_partition_queue_refuses_before_consuming(
    redis_url: str, namespace: str, core_app: ModuleType,
) -> None:
    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = f"{namespace}partition.entity.1"
    # Given partitioned messages waiting on both partitions
    for i in range(20):
        core_app.item_added.apply_async((f"ord-{i}", 0))
    depths = {q: client.llen(f"{namespace}{namespace}partition.entity.{q}") for q in (0, 1)}
    assert depths[1] > 0
    # When a plain `celery worker -Q <default queue>,<partition queue>` starts
    proc = subprocess.run(worker_argv(f"celery,{queue}"), env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    # Then it exits non-zero, saying why and what to run instead, and consumed nothing
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert f"consume partition queue(s) {queue}" in output
    assert "--pool entity --partitions 1" in output and ALLOW_PLAIN in output
    assert client.llen(f"{namespace}ran") == 0
    assert {q: client.llen(f"{namespace}{namespace}partition.entity.{q}") for q in (0, 1)} == depths


def test_a_countdown_message_holds_its_partition_instead_of_being_overtaken(
    redis_url: str, namespace: str, processes: Processes, tmp_path: Path, core_app: ModuleType,
) -> None:
    """Plain Celery keeps a countdown message aside and runs later ones first (celery#3640)."""
    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace, PARTITIONS: "entity:0"}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    order = next(f"ord-{i}" for i in range(100)
                 if core_app.cp.explain_route(core_app.app, "core.item_added", f"ord-{i}", 0).index == 0)
    # Given a key's first event published with a countdown, and four more right behind it
    core_app.item_added.apply_async((order, 0), countdown=1.5)
    for seq in range(1, 5):
        core_app.item_added.apply_async((order, seq))
    # When a partition worker consumes the partition
    processes.start(worker_argv(f"{namespace}partition.idle"), env=env, log=tmp_path / "worker.log")
    wait_for(lambda: client.llen(f"{namespace}ran") >= 5, 60, "the five events")
    # Then the countdown held the partition: the events ran in publish order
    assert client.lrange(f"{namespace}ran", 0, -1) == [f"Order:{order} {seq}" for seq in range(5)]
