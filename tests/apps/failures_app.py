"""A partitioned app for the failure tests (retries, dead letters, DCB), configured from env.

CP_REDIS_URL: broker and store; CP_NS: unique namespace (key prefix, queue prefix);
CP_BROKER_URL: another broker (RabbitMQ), the store staying on CP_REDIS_URL.
Tasks record ``start <seq>`` / ``end <seq>`` per key (tests/support/ordering.py) and a
partition-wide ``ran`` log; faults are switched by Redis flags the test sets and clears.
``seen:<task id>`` lists what each attempt of ``fail.flaky`` saw: ``prerun N``, ``body N``,
``postrun STATE N`` (N: ``request.retries``), as Celery's signals and the task body see it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, signals

import celery_partitioning as cp
from celery_partitioning import DCBConflict, with_dcb_retry

NS = os.environ.get("CP_NS", "cptest-local:")
REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

#: The broker: the Redis above by default; CP_BROKER_URL (e.g. RabbitMQ) to test another.
BROKER_URL = os.environ.get("CP_BROKER_URL") or REDIS_URL

app = Celery("failures_app", broker=BROKER_URL, set_as_current=True)
app.conf.update(
    partitioning_redis_url=REDIS_URL,
    broker_transport_options={"global_keyprefix": NS},
    partitioning_pools={"entity": 2, "dcb": 2},
    partitioning_queue_prefix=f"{NS}partition",
    partitioning_lease_ttl=2,
    worker_hijack_root_logger=False,
)
cp.install(app)

_client = redis.Redis.from_url(REDIS_URL, decode_responses=True)


def record(kind: str, key: str, seq: int) -> None:
    _client.rpush(f"{NS}rec:{key}", f"{kind} {seq}")


def _log(line: str) -> None:
    _client.rpush(f"{NS}ran", line)


def _seen(task_id: str | None, what: str) -> None:
    _client.rpush(f"{NS}seen:{task_id}", what)


def _flaky_of_this_app(sender: Any) -> bool:
    # A reloaded module keeps its receivers: each records only its own app's task.
    return sender is not None and getattr(sender, "app", None) is app and \
        getattr(sender, "name", None) == "fail.flaky"


def _on_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if _flaky_of_this_app(sender):
        _seen(task_id, f"prerun {sender.request.retries}")


def _on_postrun(sender: Any = None, task_id: str | None = None, state: str | None = None,
                **_: Any) -> None:
    if _flaky_of_this_app(sender):
        _seen(task_id, f"postrun {state} {sender.request.retries}")


signals.task_prerun.connect(_on_prerun, weak=False)
signals.task_postrun.connect(_on_postrun, weak=False)


@app.task(bind=True, name="fail.flaky", shared=False)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def flaky(self: Any, order_id: str, seq: int, failures: int = 0, countdown: float = 0.3) -> int:
    """Fails ``failures`` times, retrying with ``self.retry(countdown=...)``, then succeeds."""
    key = f"Order:{order_id}"
    record("start", key, seq)
    _log(f"{key} {seq} try{self.request.retries}")
    _seen(self.request.id, f"body {self.request.retries}")
    if self.request.retries < failures:
        raise self.retry(countdown=countdown, max_retries=5)
    record("end", key, seq)
    return int(self.request.retries)


@app.task(bind=True, name="fail.moving", shared=False)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def moving(self: Any, order_id: str, seq: int, step: int = 0, countdown: float = 0.3) -> int:
    """Retries twice, each time with ``step`` one higher (``retry(kwargs=...)``)."""
    _log(f"Order:{order_id} {seq} try{self.request.retries} step{step}")
    if self.request.retries < 2:
        raise self.retry(kwargs={"step": step + 1}, countdown=countdown, max_retries=5)
    return step


@app.task(name="fail.step", shared=False, autoretry_for=(ConnectionError,), max_retries=2,
          retry_backoff=0.1, retry_backoff_max=1, retry_jitter=False)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def step(order_id: str, seq: int) -> None:
    """Poisoned while the flag ``poison:<order>:<seq>`` is set; slow while ``slow:...`` is."""
    key = f"Order:{order_id}"
    record("start", key, seq)
    _log(f"{key} {seq}")
    if _client.get(f"{NS}slow:{order_id}:{seq}"):
        _client.set(f"{NS}slow-running:{order_id}:{seq}", "1")
        time.sleep(30)
    fault = _client.get(f"{NS}poison:{order_id}:{seq}")
    if fault == "transient":
        raise ConnectionError(f"transient fault on {key} {seq}")
    if fault:
        raise ValueError(f"poison message {key} {seq}")
    record("end", key, seq)


@app.task(name="fail.skipping", shared=False, autoretry_for=(ConnectionError,), max_retries=1,
          retry_backoff=0.2, retry_backoff_max=1, retry_jitter=False)
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity", on_failure="skip")
def skipping(order_id: str, seq: int) -> None:
    """``step`` with the failure policy ``skip``: a poisoned message is dead-lettered, the key
    goes on; a ``transient`` one retries once (its key set aside 0.2 s), then the same."""
    key = f"Order:{order_id}"
    record("start", key, seq)
    _log(f"{key} {seq}")
    fault = _client.get(f"{NS}poison:{order_id}:{seq}")
    if fault == "transient":
        raise ConnectionError(f"transient fault on {key} {seq}")
    if fault:
        raise ValueError(f"poison message {key} {seq}")
    record("end", key, seq)


@app.task(name="dcb.reserve", shared=False)
@with_dcb_retry(scope_key="tenant:{tenant_id}:reservation:{reservation_id}", max_attempts=5)
def reserve(tenant_id: str, reservation_id: str, op: int) -> None:
    """A DCB command: read the scope's version, decide, append only if the version held.

    ``inject:<scope>:<op>`` holds how many conflicts to inject before the op can apply.
    """
    scope = cp.create_scope_key(tenant_id, "reservation", reservation_id)
    version_key, log_key = f"{NS}scope:{scope}:version", f"{NS}scope:{scope}:log"
    _client.rpush(f"{NS}attempts:{scope}", f"{op}")
    with _client.pipeline() as pipe:
        pipe.watch(version_key)
        version = int(pipe.get(version_key) or 0)
        if _client.decr(f"{NS}inject:{scope}:{op}") >= 0:
            _client.incr(version_key)  # another writer moved the scope meanwhile
        pipe.multi()
        pipe.incr(version_key)
        pipe.rpush(log_key, f"{op}@{version}")
        try:
            pipe.execute()
        except redis.WatchError:
            raise DCBConflict(scope, expected_version=version,
                              actual_version=int(_client.get(version_key) or 0)) from None
