"""An app for the partition life-cycle test: one partition, a task that records each run.

``make_app(redis_url, ns)`` builds it (one partition in pool ``entity``, lease TTL 2 s);
``lifecycle.step(key, seq)`` appends ``[key, seq, pid, started, ended]`` to ``{ns}lifecycle:log``.

Run as a module it is the standby process: ``python -m tests.apps.lifecycle_app REDIS_URL NS
RUNS``: an in-process partition worker that waits for the partition's lease, and each time it
holds it, runs ``RUNS`` messages, then stops its partition (handing the lease over) and
starts it again (a standby once more), until ``{ns}lifecycle:done`` is set.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

import redis
from celery import Celery

import celery_partitioning as cp


def log_key(ns: str) -> str:
    return f"{ns}lifecycle:log"


def make_app(redis_url: str, ns: str) -> Celery:
    app = Celery(f"lifecycle{uuid.uuid4().hex[:6]}", broker=redis_url, backend=redis_url,
                 set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": ns},
        result_backend_transport_options={"global_keyprefix": ns},
        partitioning_pools={"entity": 1},
        partitioning_queue_prefix=f"{ns}partition",
        partitioning_redis_url=redis_url,
        partitioning_lease_ttl=2,
        task_ignore_result=True,
    )
    cp.install(app)
    client = redis.Redis.from_url(redis_url)

    @app.task(name="lifecycle.step", shared=False)
    @cp.partitioned(lambda call: call["key"], pool="entity")
    def step(key: str, seq: int) -> None:
        started = time.time()
        time.sleep(0.01)
        record = json.dumps([key, seq, os.getpid(), started, time.time()])
        with client.pipeline() as pipe:
            pipe.rpush(log_key(ns), record).incr(f"{ns}lifecycle:runs:{os.getpid()}").execute()

    return app


def runs_of(client: Any, ns: str, pid: int) -> int:
    """How many messages process ``pid`` has run."""
    return int(client.get(f"{ns}lifecycle:runs:{pid}") or 0)


def main(redis_url: str, ns: str, runs: int) -> None:
    from celery_partitioning.worker.inprocess import InProcessWorker

    client = redis.Redis.from_url(redis_url)
    app = make_app(redis_url, ns)
    client.set(f"{ns}lifecycle:ready", os.getpid())
    done = f"{ns}lifecycle:done"
    with InProcessWorker(app, "entity", start_timeout=600) as worker:  # a standby until then
        unit = worker.partition("entity", 0)
        while not client.exists(done):
            if unit.consuming:
                target = runs_of(client, ns, os.getpid()) + runs
                while runs_of(client, ns, os.getpid()) < target and not client.exists(done):
                    time.sleep(0.02)
                unit.stop()   # hand the lease over to the test process, waiting as a standby
                lease = unit.runtime.lease
                deadline = time.monotonic() + 30
                while lease is not None and lease.holder() is None and time.monotonic() < deadline:
                    time.sleep(0.02)  # started at once, it would win the lease back itself
                unit.start()  # and wait for it again
            time.sleep(0.02)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
