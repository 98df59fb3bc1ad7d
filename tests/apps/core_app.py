"""A small partitioned app for the core integration tests, configured from the environment.

CP_REDIS_URL: broker and store; CP_NS: unique namespace (key prefix, queue prefix);
CP_INVALID=1: also register a misconfigured projection (the worker must refuse to start).
"""

from __future__ import annotations

import os

import redis
from celery import Celery

import celery_partitioning as cp

NS = os.environ.get("CP_NS", "cptest-local:")
REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

app = Celery("core_app", broker=REDIS_URL, set_as_current=True)
app.conf.update(
    broker_transport_options={"global_keyprefix": NS},
    partitioning_pools={"entity": 2, "global": 1},
    partitioning_queue_prefix=f"{NS}partition",
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
cp.install(app)

_client = redis.Redis.from_url(REDIS_URL)


def record(kind: str, key: str, seq: int) -> None:
    _client.rpush(f"{NS}rec:{key}", f"{kind} {seq}")


@app.task(name="core.item_added")
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def item_added(order_id: str, seq: int) -> None:
    record("start", f"Order:{order_id}", seq)
    _client.rpush(f"{NS}ran", f"Order:{order_id} {seq}")
    record("end", f"Order:{order_id}", seq)


@app.task(name="core.item_removed")
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def item_removed(order_id: str, seq: int) -> None:
    item_added(order_id, seq)


if os.environ.get("CP_INVALID") == "1":

    @app.task(name="core.broken_projection")
    @cp.projection("orderSummary")
    def broken_projection(order_id: str) -> None: ...

    @app.task(name="core.wrong_pool")
    @cp.partitioned(cp.create_entity_partition_key("Order"), pool="nowhere")
    def wrong_pool(order_id: str) -> None: ...


app.conf.result_backend = REDIS_URL
app.conf.result_backend_transport_options = {"global_keyprefix": NS}


@app.task(name="core.link", bind=True)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def link(self: object, previous: object = None, order_id: str = "", step: int = 0) -> str:
    request = self.request  # type: ignore[attr-defined]
    _client.rpush(
        f"{NS}links",
        f"{order_id} {step} {request.delivery_info.get('routing_key')} {getattr(request, 'partition_key', None)}",
    )
    return order_id


@app.task(name="core.rollup", bind=True)
@cp.partitioned(lambda args: cp.GLOBAL_PARTITION_KEY, pool="global")
def rollup(self: object, results: list[str]) -> int:
    request = self.request  # type: ignore[attr-defined]
    _client.rpush(f"{NS}links", f"rollup {len(results)} {request.delivery_info.get('routing_key')} "
                  f"{getattr(request, 'partition_key', None)}")
    return len(results)


@app.task(name="core.plain")
def plain(n: int) -> None:
    _client.rpush(f"{NS}plain", str(n))
