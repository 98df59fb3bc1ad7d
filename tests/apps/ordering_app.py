"""A partitioned app for the affinity-worker tests, configured from the environment.

CPW_BROKER: broker URL (Redis or RabbitMQ); CPW_REDIS: Redis for records, leases and dead
letters; CPW_NS: unique namespace (kombu global_keyprefix, queue prefix, record keys);
CPW_PARTITIONS: partitions of the pool ``p``; CPW_LEASE_TTL: lease TTL in seconds;
CPW_OWN_CONTROL=1: a control exchange of the run's own (concurrent RabbitMQ runs).

The task ``ordering.record(key, seq, ms, signal)`` appends ``start <seq>`` / ``end <seq>`` to
the list ``{ns}rec:{key}``, and ``start|end <pid> <key> <seq>`` to ``{ns}part:{label}`` (the
partition's own log, to check that two workers never ran one partition at once). With
``signal`` set it also pushes ``<pid> <label> <key> <seq>`` to ``{ns}{signal}`` at start, so a
test can kill the worker while it is inside that very task: the first run of a signalled task
takes its ``ms`` (make it long: the kill cuts it short, however late the test reacts), and a
re-run of it (after that kill) takes 2 ms.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

import celery_partitioning as cp
from celery_partitioning.worker import current_runtime

__all__ = ["make_app", "app"]


def _key(args: Any) -> str:
    return str(args["key"])


def make_app(broker: str, store: str, ns: str, partitions: int, lease_ttl: float = 2.0) -> Celery:
    """A fresh app; producers in tests build theirs with the same arguments as the workers."""
    app = Celery(f"{ns}ordering", broker=broker, set_as_current=False)
    options = {"global_keyprefix": ns} if broker.startswith("redis") else {}
    app.conf.update(
        broker_transport_options=options,
        partitioning_pools={"p": partitions},
        partitioning_queue_prefix=f"{ns}partition",
        partitioning_lease_ttl=lease_ttl,
        partitioning_redis_url=store,
        worker_hijack_root_logger=True,
        broker_connection_retry_on_startup=True,
    )
    if os.environ.get("CPW_OWN_CONTROL") == "1":
        # RabbitMQ: node names (partitions0@host) are the same in every test run; a control
        # exchange of its own keeps this run's pidbox queues apart from a concurrent run's
        app.conf.control_exchange = f"{ns}celery"
    cp.install(app)
    client = redis.Redis.from_url(store)

    @app.task(name="ordering.record", shared=False)
    @cp.partitioned(_key, pool="p")
    def record(key: str, seq: int, ms: int = 2, signal: str | None = None) -> None:
        runtime = current_runtime(app)
        label = runtime.label if runtime is not None else "none"
        pid = os.getpid()
        client.rpush(f"{ns}part:{label}", f"start {pid} {key} {seq}")
        earlier = client.rpush(f"{ns}rec:{key}", f"start {seq}") - 1
        if signal:
            rerun = earlier > 0 and f"start {seq}".encode() in client.lrange(
                f"{ns}rec:{key}", 0, earlier - 1)
            ms = 2 if rerun else ms
            client.rpush(f"{ns}{signal}", f"{pid} {label} {key} {seq}")
        if signal:  # a held task: a test may end the hold early (Harness.release)
            until = time.monotonic() + ms / 1000
            while time.monotonic() < until and not client.exists(f"{ns}release:{key}:{seq}"):
                time.sleep(0.05)
        else:
            time.sleep(ms / 1000)
        client.rpush(f"{ns}rec:{key}", f"end {seq}")
        client.rpush(f"{ns}part:{label}", f"end {pid} {key} {seq}")
        client.incr(f"{ns}done")

    return app


app = make_app(
    broker=os.environ.get("CPW_BROKER") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
    store=os.environ.get("CPW_REDIS") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
    ns=os.environ.get("CPW_NS", "cpw-local:"),
    partitions=int(os.environ.get("CPW_PARTITIONS", "4")),
    lease_ttl=float(os.environ.get("CPW_LEASE_TTL", "2")),
)
