"""The app the drain/memory benchmarks run: the same task body, partitioned and plain.

Configured from the environment (the benchmark sets it for its worker processes):
BENCH_BROKER (Redis URL), BENCH_NS (kombu global_keyprefix and queue prefix),
BENCH_PARTITIONS (partitions of pool ``bench``).

Both tasks run ``work(ms)`` and then report to Redis in one round trip (count and time of
the last end). A worker's first task waits for the benchmark's "go" key, so every worker is
started, connected and holding a message when the clock starts: start-up is not measured.
"""

from __future__ import annotations

import os
import threading
import time

import redis
from celery import Celery

import celery_partitioning as cp

__all__ = ["app", "make_app", "PLAIN_TASK", "PARTITIONED_TASK", "plain_queue"]

PLAIN_TASK = "bench.plain.work"
PARTITIONED_TASK = "bench.part.work"


def plain_queue(ns: str) -> str:
    return f"{ns}plain"


class _Gate(threading.local):
    """Per worker thread (a partition, or a plain worker's pool slot): whether it has seen
    the benchmark's start signal yet."""

    open: bool = False


def make_app(broker: str, ns: str, partitions: int) -> Celery:
    app = Celery(f"{ns}bench", broker=broker, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": ns},
        partitioning_pools={"bench": partitions},
        partitioning_queue_prefix=f"{ns}partition",
        task_default_queue=plain_queue(ns),
        # What a partition worker forces, given to the plain workers too: same semantics.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_disable_rate_limits=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    cp.install(app)
    client = redis.Redis.from_url(broker)
    gate = _Gate()

    def work(ms: float) -> None:
        if not gate.open:
            client.sadd(f"{ns}ready", f"{os.getpid()}:{threading.get_ident()}")
            while not client.exists(f"{ns}go"):
                time.sleep(0.002)
            gate.open = True
        if ms:
            time.sleep(ms / 1000)
        pipe = client.pipeline(transaction=False)
        pipe.incr(f"{ns}done")
        pipe.set(f"{ns}last", repr(time.time()))
        pipe.execute()

    @app.task(name=PLAIN_TASK, shared=False)
    def plain_work(key: str, ms: float = 0) -> None:
        work(ms)

    @app.task(name=PARTITIONED_TASK, shared=False)
    @cp.partitioned(lambda args: str(args["key"]), pool="bench")
    def partitioned_work(key: str, ms: float = 0) -> None:
        work(ms)

    return app


app = make_app(
    broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/13"),
    ns=os.environ.get("BENCH_NS", "cpbench-local:"),
    partitions=int(os.environ.get("BENCH_PARTITIONS", "1")),
)
