"""Emptying partition queues (``celery partitioning purge``); plain ``celery purge`` skips them.

``celery purge`` empties the queues a plain worker would consume (``task_default_queue`` and
``task_queues``); partition queues are declared by the partition router, not listed there, so
it leaves them alone. ``plan_purge`` reads the selected partition queues (depth; consumers on
AMQP) and their leases (Redis) and changes nothing; ``purge`` deletes the waiting messages:
on Redis every priority list of the queue (kombu's own names, ``global_keyprefix`` included),
on AMQP with ``queue.purge``. Messages a worker holds (delivered, not acked), dead letters
and parked keys are not touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .app import settings_of
from .config import redis_namespace
from .redis_keys import RedisKeys
from .worker.lease import parse_holder
from .worker.recovery import BrokerRedis, broker_redis
from .worker.supervisor import select_partitions

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["QueuePlan", "plan_purge", "purge"]


@dataclass(frozen=True)
class QueuePlan:
    """One selected partition queue before purging."""

    pool: str
    index: int
    queue: str
    #: Messages waiting (0 when the queue was never declared).
    depth: int
    #: Who consumes it: the lease holder (Redis) or "N consumer(s)" (AMQP); None when idle.
    consumer: str | None


def _lease_holders(app: Celery, queues: Sequence[str]) -> dict[str, str]:
    """``queue → "node (pid N)"`` for every selected queue whose lease is held (Redis store)."""
    url = settings_of(app).redis_url
    if url is None or not queues:
        return {}
    import redis

    keys = RedisKeys(redis_namespace(app.conf))
    client = redis.Redis.from_url(url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.get(keys.lease(queue))
                pipe.pttl(keys.lease(queue))
            replies = pipe.execute()
    finally:
        client.close()
    held: dict[str, str] = {}
    for i, queue in enumerate(queues):
        holder = parse_holder(replies[2 * i], int(replies[2 * i + 1]))
        if holder is not None:
            held[queue] = holder.describe()
    return held


def _declared(conn: Any, queue: str) -> tuple[int, int]:
    """AMQP: ``(messages, consumers)`` of a queue; ``(0, 0)`` when the broker does not know it."""
    channel = conn.channel()
    try:
        _name, depth, consumers = channel.queue_declare(queue=queue, passive=True)
        return int(depth), int(consumers or 0)
    except conn.channel_errors:
        return 0, 0
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def plan_purge(app: Celery, pools: Sequence[str] = (), partitions: str | None = None) -> list[QueuePlan]:
    """The selected partition queues with their depth and consumer; changes nothing."""
    specs = select_partitions(settings_of(app), pools, partitions)
    held = _lease_holders(app, [s.queue for s in specs])
    plans: list[QueuePlan] = []
    broker = broker_redis(app)
    if broker is not None:
        try:
            for spec in specs:
                plans.append(QueuePlan(spec.pool, spec.index, spec.queue, broker.depth(spec.queue),
                                       held.get(spec.queue)))
        finally:
            broker.close()
        return plans
    with app.connection_for_write() as conn:
        for spec in specs:
            depth, consumers = _declared(conn, spec.queue)
            consumer = held.get(spec.queue) or (f"{consumers} consumer(s)" if consumers else None)
            plans.append(QueuePlan(spec.pool, spec.index, spec.queue, depth, consumer))
    return plans


def _purge_redis(broker: BrokerRedis, queue: str) -> int:
    # One MULTI per queue: the count is exactly what was deleted.
    with broker.client.pipeline(transaction=True) as pipe:
        for name in broker.queue_lists(queue):
            pipe.llen(name)
            pipe.delete(name)
        replies = pipe.execute()
    return sum(int(n) for n in replies[::2])


def purge(app: Celery, queues: Sequence[str]) -> dict[str, int]:
    """Delete the waiting messages of ``queues``: ``queue → messages deleted``."""
    deleted: dict[str, int] = {}
    broker = broker_redis(app)
    if broker is not None:
        try:
            for queue in queues:
                deleted[queue] = _purge_redis(broker, queue)
        finally:
            broker.close()
        return deleted
    with app.connection_for_write() as conn:
        for queue in queues:
            if _declared(conn, queue) == (0, 0):
                deleted[queue] = 0  # nothing there (purging an unknown queue closes the channel)
                continue
            channel = conn.channel()
            try:
                deleted[queue] = int(channel.queue_purge(queue=queue) or 0)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    return deleted
