"""A partitioned app that records what Celery's toolbox sees in a partition worker.

CP_REDIS_URL: broker, result backend and record store; CP_NS: unique namespace. Signal
handlers record every task signal (with the thread it ran in) and ``worker_process_init``;
``toolbox.echo`` records its ``bind=True`` request fields and retries once in place when asked.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import redis
from celery import Celery, signals

import celery_partitioning as cp

NS = os.environ.get("CP_NS", "cptest-local:")
REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

app = Celery("toolbox_app", broker=REDIS_URL, backend=REDIS_URL, set_as_current=True)
app.conf.update(
    broker_transport_options={"global_keyprefix": NS},
    result_backend_transport_options={"global_keyprefix": NS},
    partitioning_pools={"entity": 2},
    partitioning_queue_prefix=f"{NS}partition",
    partitioning_lease_ttl=2,
    worker_hijack_root_logger=False,
)
cp.install(app)

_client = redis.Redis.from_url(REDIS_URL, decode_responses=True)


def _ours() -> bool:
    """Record only in the worker process of this app's test (its environment names NS): a
    test process that imported this module also fires these signals for other tests' tasks."""
    return os.environ.get("CP_NS") == NS


def _record(what: str, task_id: str | None) -> None:
    if _ours():
        _client.rpush(f"{NS}signals", f"{what} {task_id} {threading.current_thread().name}")


@signals.worker_process_init.connect
def _process_init(**_: Any) -> None:
    if _ours():
        _client.rpush(f"{NS}process_init", str(os.getpid()))


@signals.task_prerun.connect
def _prerun(task_id: str, **_: Any) -> None:
    _record("prerun", task_id)


@signals.task_postrun.connect
def _postrun(task_id: str, state: str, **_: Any) -> None:
    _record(f"postrun:{state}", task_id)


@signals.task_success.connect
def _success(sender: Any, **_: Any) -> None:
    _record("success", sender.request.id)


@signals.task_failure.connect
def _failure(task_id: str, **_: Any) -> None:
    _record("failure", task_id)


@signals.task_retry.connect
def _retry(request: Any, **_: Any) -> None:
    _record("retry", request.id)


@app.task(bind=True, name="toolbox.echo", shared=False)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def echo(self: Any, order_id: str, retry_once: bool = False, countdown: float = 0) -> str:
    request = self.request
    _client.rpush(f"{NS}requests", json.dumps({
        "id": request.id, "hostname": request.hostname, "retries": request.retries,
        "args": list(request.args or []), "is_eager": request.is_eager,
        "routing_key": (request.delivery_info or {}).get("routing_key"),
        "partition_key": getattr(request, "partition_key", None),
    }))
    if retry_once and request.retries == 0:
        raise self.retry(countdown=countdown, max_retries=3)
    return f"echo {order_id} after {request.retries} retries"


@app.task(name="toolbox.boom", shared=False)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def boom(order_id: str) -> None:
    raise ValueError(f"boom {order_id}")
