"""Per-call CPU cost of computing a partition: key function, hash, argument binding, router.

Goal: key function + hash <= 5 µs per call. No broker needed.

    python -m benchmarks.bench_keyhash          # BENCH_KEYHASH_CALLS=50000
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable
from typing import Any

from celery import Celery

import celery_partitioning
from benchmarks.common import Table, env_int, machine
from celery_partitioning import create_entity_partition_key, partition_for, partitioned
from celery_partitioning.hashing import jump_hash, key_hash
from celery_partitioning.state import partitioning_of

GOAL_US = 5.0


def _per_call_us(fn: Callable[[], Any], calls: int, repeat: int = 5) -> tuple[float, float]:
    """(best, median) microseconds per call over ``repeat`` runs of ``calls`` calls."""
    runs = timeit.repeat(fn, number=calls, repeat=repeat)
    per = [run / calls * 1e6 for run in runs]
    return min(per), statistics.median(per)


def make_app() -> Celery:
    app = Celery("bench-keyhash", broker="memory://", set_as_current=False)
    app.conf.partitioning_pools = {"entity": 8}
    celery_partitioning.install(app)

    @app.task(name="bench.order_item_added", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def order_item_added(order_id: str, sku: str, qty: int = 1) -> None:
        return None

    @app.task(name="bench.plain", shared=False)
    def plain(order_id: str, sku: str, qty: int = 1) -> None:
        return None

    app.finalize()
    return app


def run(calls: int) -> Table:
    key_fn = create_entity_partition_key("Order")
    named = {"order_id": "ord-123456", "sku": "sku-1", "qty": 2}
    key = key_fn(named)
    app = make_app()
    router = partitioning_of(app).router
    plan = router._plan("bench.order_item_added", app.tasks["bench.order_item_added"])
    assert plan is not None
    binder = plan.binder
    args, kwargs = ("ord-123456", "sku-1"), {"qty": 2}
    task = app.tasks["bench.order_item_added"]
    plain_task = app.tasks["bench.plain"]

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("key function alone (entity key from a dict)", lambda: key_fn(named)),
        ("blake2b-64 of the key", lambda: key_hash(key)),
        ("jump hash into 8 buckets", lambda: jump_hash(0x9E3779B97F4A7C15, 8)),
        ("partition_for(key, 8)", lambda: partition_for(key, 8)),
        ("**key function + hash** (goal <= 5 µs)", lambda: partition_for(key_fn(named), 8)),
        ("bind args by signature + key function + hash", lambda: partition_for(binder(args, kwargs), 8)),
        ("router call, partitioned task (bind, key, hash, headers, checks)",
         lambda: router("bench.order_item_added", args, kwargs, {}, task)),
        ("router call, plain task (returns None)",
         lambda: router("bench.plain", args, kwargs, {}, plain_task)),
    ]
    table = Table(f"Per-call CPU cost ({calls:,} calls x 5 runs; {machine()})",
                  ["what", "best µs/call", "median µs/call"])
    for label, fn in cases:
        best, median = _per_call_us(fn, calls)
        table.add(label, best, median)
    return table


def main() -> None:
    table = run(env_int("BENCH_KEYHASH_CALLS", 50_000))
    table.print()


if __name__ == "__main__":
    main()
