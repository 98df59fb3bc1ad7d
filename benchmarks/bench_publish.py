"""Publish cost: partitioned ``apply_async`` vs plain Celery ``apply_async``, same run, same Redis.

Three variants publish the same calls (same argument shapes) to the same Redis broker,
interleaved round by round so a busy machine's noise hits them alike:

* ``plain``        - a plain Celery app (partitioning not installed), default queue;
* ``partitioned``  - a partitioned task (entity key, 8 partitions) of an installed app;
* ``plain+router`` - a non-partitioned task of the installed app (what the router costs others).

Goal: partitioned / plain <= 1.03. On a shared machine the per-round numbers swing by +-40 %,
so both the median and the best round (the least disturbed one) are reported.

    python -m benchmarks.bench_publish   # BENCH_PUBLISH_BATCH=100 BENCH_PUBLISH_ROUNDS=60
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

import celery_partitioning
from benchmarks.common import Table, env_int, interleaved, machine, namespace_for, ratio, redis_url
from celery_partitioning import create_entity_partition_key, partitioned

__all__ = ["make_apps", "run", "main"]

#: variant → task name (the ``plain`` variant's task is on the plain app).
VARIANTS = {
    "plain": "bench.plain.order_item_added",
    "partitioned": "bench.part.order_item_added",
    "plain+router": "bench.part.plain_item_added",
}


def _conf(app: Celery, namespace: str) -> None:
    app.conf.broker_transport_options = {"global_keyprefix": namespace}
    app.conf.task_default_queue = "bench.plain"
    app.conf.broker_connection_retry_on_startup = False


def make_apps(url: str, namespace: str) -> tuple[Celery, Celery]:
    """(plain app, partitioned app), both on ``url`` under ``namespace``."""
    plain = Celery("bench-plain", broker=url, set_as_current=False)
    _conf(plain, namespace)

    @plain.task(name="bench.plain.order_item_added", shared=False)
    def plain_item_added(order_id: str, sku: str, qty: int = 1) -> None:
        return None

    part = Celery("bench-part", broker=url, set_as_current=False)
    _conf(part, namespace)
    part.conf.partitioning_pools = {"entity": 8}
    celery_partitioning.install(part)

    @part.task(name="bench.part.order_item_added", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def part_item_added(order_id: str, sku: str, qty: int = 1) -> None:
        return None

    @part.task(name="bench.part.plain_item_added", shared=False)
    def part_plain_item_added(order_id: str, sku: str, qty: int = 1) -> None:
        return None

    plain.finalize()
    part.finalize()
    return plain, part


def _publisher(task: Any, batch: int, cpu: list[float]) -> Callable[[], float]:
    """Publishes one batch; returns wall µs/message and appends CPU µs/message to ``cpu``."""
    counter = iter(range(10**12))

    def publish_batch() -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(batch):
            i = next(counter)
            task.apply_async((f"ord-{i % 1000}", "sku-1"), {"qty": i})
        cpu.append((time.process_time() - start_cpu) / batch * 1e6)
        return (time.perf_counter() - start) / batch * 1e6

    return publish_batch


def _clear_queues(client: redis.Redis, namespace: str) -> None:
    for name in client.scan_iter(match=f"{namespace}*", count=1000):
        if not name.startswith(f"{namespace}_kombu".encode()):
            client.delete(name)


def run(batch: int, rounds: int) -> Table:
    url = redis_url()
    with namespace_for("publish") as ns:
        plain, part = make_apps(url, ns)
        client = redis.Redis.from_url(url)
        try:
            cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
            publishers = {name: _publisher(part.tasks[task] if name != "plain" else plain.tasks[task],
                                           batch, cpu[name])
                          for name, task in VARIANTS.items()}
            for publish in publishers.values():  # warm up: connections, caches, declarations
                publish()
            for timings in cpu.values():
                timings.clear()
            _clear_queues(client, ns)

            def clearing(publish: Callable[[], float]) -> Callable[[], float]:
                def go() -> float:
                    try:
                        return publish()
                    finally:
                        _clear_queues(client, ns)
                return go

            results = interleaved({k: clearing(v) for k, v in publishers.items()}, rounds)
        finally:
            client.close()
            plain.close()
            part.close()
    table = Table(f"Publish cost, Redis broker ({rounds} interleaved rounds x {batch} messages; {machine()})",
                  ["variant", "wall µs/msg median", "ratio vs plain", "wall µs/msg best",
                   "ratio vs plain (best)", "client CPU µs/msg best", "CPU ratio (best)"])
    for name, timings in results.items():
        table.add(name, statistics.median(timings), ratio(timings, results["plain"]),
                  min(timings), min(timings) / min(results["plain"]),
                  min(cpu[name]), min(cpu[name]) / min(cpu["plain"]))
    return table


def main() -> None:
    run(env_int("BENCH_PUBLISH_BATCH", 100), env_int("BENCH_PUBLISH_ROUNDS", 60)).print()


if __name__ == "__main__":
    main()
