# test_orders_in_process.py: partitioned tasks end to end on in-process partition workers.
# Needs a Redis (REDIS_URL); no Docker and no worker process.
import os
import time

import pytest
from celery import Celery

import celery_partitioning
from celery_partitioning import create_entity_partition_key, partitioned

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

app = Celery("shop_tests", broker=REDIS_URL, backend=REDIS_URL)
app.conf.partitioning_pools = {"entity": 4}
app.conf.partitioning_redis_url = REDIS_URL
app.conf.partitioning_queue_prefix = "shop-tests"  # queues apart from a real worker's
celery_partitioning.install(app)

lines = {}


@app.task(bind=True, max_retries=3, default_retry_delay=0.05, shared=False)
@partitioned(create_entity_partition_key("Order"), pool="entity")
def item_added(self, order_id, sku, fail_once=False):
    if fail_once and self.request.retries == 0:
        raise self.retry()  # retried in place: the order's next message waits for it
    lines.setdefault(order_id, []).append(sku)
    return len(lines[order_id])


@pytest.fixture
def partition_worker_app():
    return app  # in your project: from proj.celery import app


def test_an_order_runs_in_publish_order(partition_worker):
    started = time.monotonic()
    first = item_added.delay("ord-1", "sku-1", fail_once=True)
    second = item_added.delay("ord-1", "sku-2")
    other = item_added.delay("ord-2", "sku-9")
    assert [first.get(timeout=10), second.get(timeout=10), other.get(timeout=10)] == [1, 2, 1]
    assert lines == {"ord-1": ["sku-1", "sku-2"], "ord-2": ["sku-9"]}
    print(f"published and ran in {time.monotonic() - started:.2f}s")
