"""A partitioned app for the metrics tests and benchmark, configured from the environment.

CP_REDIS_URL: broker and store; CP_NS: unique namespace (key prefix, queue prefix).
``m.work`` retries in place ``retries`` times, then fails for good when ``fail`` (the key is
parked), else succeeds; every finished message (succeeded or failed) is logged in ``done``.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

import celery_partitioning as cp

NS = os.environ.get("CP_NS", "cptest-local:")
REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

app = Celery("metrics_app", broker=REDIS_URL, set_as_current=True)
app.conf.update(
    partitioning_redis_url=REDIS_URL,
    broker_transport_options={"global_keyprefix": NS},
    partitioning_pools={"entity": 2},
    partitioning_queue_prefix=f"{NS}partition",
    partitioning_lease_ttl=2,
    worker_hijack_root_logger=False,
)
cp.install(app)

_client = redis.Redis.from_url(REDIS_URL)


@app.task(bind=True, name="m.work", shared=False)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def work(self: Any, order_id: str, seq: int, retries: int = 0, fail: bool = False) -> None:
    if self.request.retries < retries:
        raise self.retry(countdown=0.01, max_retries=5)  # short: retried in place
    _client.rpush(f"{NS}done", f"Order:{order_id} {seq}")
    if fail:
        raise ValueError(f"poison Order:{order_id} {seq}")
