"""A partitioned app for the reliability suite (chaos, broker restart), configured from the environment.

CPR_BROKER: broker URL (Redis or RabbitMQ); CPR_STORE: Redis for leases and dead letters
(default: the broker when it is Redis); CPR_RECORDS: Redis the task writes its records to
(kept separate so a broker restart does not fail the task itself); CPR_NS: unique namespace
(kombu global_keyprefix, queue prefix, record keys); CPR_PARTITIONS: partitions of pool ``p``;
CPR_LEASE_TTL: lease TTL in seconds; CPR_CONF: more settings as a JSON object (e.g. a Sentinel
broker's ``broker_transport_options``, merged with the ``global_keyprefix``).

The task ``reliability.record(key, seq, ms)`` appends ``start <seq>`` / ``end <seq>`` to
``{ns}rec:<key_digest(key)>`` (checked by tests.support.ordering; the key text itself never
becomes part of a Redis key name, as in the library), ``start|end <pid> <key> <seq>`` to
``{ns}part:<pool.index>`` (two processes must never run one partition at once), and adds
``<key> <seq>`` to the set ``{ns}done`` when it ends (distinct completions).
The task ``reliability.fail(key)`` always raises: its message becomes a dead letter.
The task ``reliability.flaky(key, seq, fails, ms, countdown)`` records like ``record`` but
raises ``self.retry(countdown=...)`` on its first ``fails`` attempts (0.05 s: in place, the
same delivery runs again; 0.1 s or more: the key is set aside until then);
each attempt appends ``<key> <seq> <attempt> <x-delivery-count or 0>`` to ``{ns}attempts``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

import celery_partitioning as cp
from celery_partitioning.store.keys import key_digest
from celery_partitioning.worker import current_runtime

__all__ = ["make_app", "app", "RECORD_TASK", "FAIL_TASK", "FLAKY_TASK", "record_list"]

RECORD_TASK = "reliability.record"
FAIL_TASK = "reliability.fail"
FLAKY_TASK = "reliability.flaky"


def record_list(ns: str, key: str) -> str:
    """The Redis list a key's start/end records go to."""
    return f"{ns}rec:{key_digest(key)}"


def _key(args: Any) -> str:
    return str(args["key"])


def make_app(broker: str, records: str, ns: str, partitions: int, lease_ttl: float = 2.0,
             store: str | None = None, conf: dict[str, Any] | None = None) -> Celery:
    """A fresh app; the tests' producers build theirs with the same arguments as the workers."""
    app = Celery(f"{ns}reliability", broker=broker, set_as_current=False)
    extra = dict(conf or {})
    transport_options = {**extra.pop("broker_transport_options", {}), "global_keyprefix": ns}
    app.conf.update(
        broker_transport_options=transport_options,  # Redis only; others ignore it
        partitioning_pools={"p": partitions},
        partitioning_queue_prefix=f"{ns}partition",
        partitioning_lease_ttl=lease_ttl,
        partitioning_redis_url=store,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=True,
        **extra,
    )
    cp.install(app)
    client = redis.Redis.from_url(records)

    @app.task(name=RECORD_TASK, shared=False)
    @cp.partitioned(_key, pool="p")
    def record(key: str, seq: int, ms: int = 1) -> None:
        runtime = current_runtime(app)
        label = runtime.label if runtime is not None else "none"
        pid = os.getpid()
        client.rpush(f"{ns}part:{label}", f"start {pid} {key} {seq}")
        client.rpush(record_list(ns, key), f"start {seq}")
        if ms:
            time.sleep(ms / 1000)
        client.rpush(record_list(ns, key), f"end {seq}")
        client.rpush(f"{ns}part:{label}", f"end {pid} {key} {seq}")
        client.sadd(f"{ns}done", f"{key_digest(key)} {seq}")

    @app.task(name=FLAKY_TASK, shared=False, bind=True)
    @cp.partitioned(_key, pool="p")
    def flaky(self: Any, key: str, seq: int, fails: int = 1, ms: int = 1,
              countdown: float = 0.05) -> None:
        runtime = current_runtime(app)
        label = runtime.label if runtime is not None else "none"
        pid = os.getpid()
        attempt = int(client.incr(f"{ns}tries:{key_digest(key)}:{seq}"))
        deliveries = self.request.get("x-delivery-count") or 0
        client.rpush(f"{ns}attempts", f"{key_digest(key)} {seq} {attempt} {deliveries}")
        client.rpush(f"{ns}part:{label}", f"start {pid} {key} {seq}")
        client.rpush(record_list(ns, key), f"start {seq}")
        if attempt <= fails:
            client.rpush(f"{ns}part:{label}", f"end {pid} {key} {seq}")
            raise self.retry(countdown=countdown, max_retries=fails + 5)
        if ms:
            time.sleep(ms / 1000)
        client.rpush(record_list(ns, key), f"end {seq}")
        client.rpush(f"{ns}part:{label}", f"end {pid} {key} {seq}")
        client.sadd(f"{ns}done", f"{key_digest(key)} {seq}")

    @app.task(name=FAIL_TASK, shared=False)
    @cp.partitioned(_key, pool="p")
    def fail(key: str) -> None:
        client.sadd(f"{ns}failed", key_digest(key))
        raise RuntimeError("this task always fails")

    return app


_records = os.environ.get("CPR_RECORDS") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
app = make_app(
    broker=os.environ.get("CPR_BROKER", _records),
    records=_records,
    ns=os.environ.get("CPR_NS", "cpr-local:"),
    partitions=int(os.environ.get("CPR_PARTITIONS", "4")),
    lease_ttl=float(os.environ.get("CPR_LEASE_TTL", "2")),
    store=os.environ.get("CPR_STORE") or None,
    conf=json.loads(os.environ.get("CPR_CONF") or "{}"),
)
