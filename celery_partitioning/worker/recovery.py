"""Crash recovery on Redis: a partition's unacked messages go back to the HEAD of its queue.

kombu's Redis transport (``kombu/transport/redis.py``) keeps each delivered, not yet acked
message in the hash ``unacked`` (delivery tag → JSON ``[payload, exchange, routing_key]``)
and its delivery time in the sorted set ``unacked_index``, both under ``global_keyprefix``.
Publishing is ``LPUSH``, consuming ``BRPOP``: the head of a queue is the right end. After a
SIGKILL the message stays there until ``visibility_timeout`` (an hour by default) while a
restarted worker runs later messages; ``reject(requeue=True)`` would ``LPUSH`` it to the
back. So the new lease holder, before it consumes, moves the entries whose routing key is
its own queue (and only those) back with ``RPUSH``, newest first so the oldest ends up at
the head, in one WATCH/MULTI transaction on both keys (as kombu's own ``restore_by_tag``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["BrokerRedis", "broker_redis", "restore_unacked_to_head", "unacked_by_queue"]

logger = logging.getLogger("celery_partitioning.worker")


@dataclass
class BrokerRedis:
    """kombu's Redis key names for the app's broker, prefixed, and a plain client to it."""

    #: A redis-py client without kombu's key prefixing: every name below is complete.
    client: Any
    prefix: str
    unacked: str
    unacked_index: str
    sep: str
    priority_steps: tuple[int, ...]

    def queue_list(self, queue: str, priority: int = 0) -> str:
        """The Redis list of ``queue`` for a priority (kombu ``_q_for_pri``)."""
        steps = [s for s in self.priority_steps if s <= priority] or [0]
        step = steps[-1]
        return f"{self.prefix}{queue}{self.sep}{step}" if step else f"{self.prefix}{queue}"

    def queue_lists(self, queue: str) -> list[str]:
        """Every priority list of ``queue``, the one consumed first (priority 0) first."""
        return [self.queue_list(queue, step) for step in self.priority_steps]

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (all priority lists)."""
        with self.client.pipeline(transaction=False) as pipe:
            for name in self.queue_lists(queue):
                pipe.llen(name)
            return sum(int(n) for n in pipe.execute())

    def refresh(self, tags: Iterable[str]) -> None:
        """Move delivery times of still-held messages to now, so kombu's
        visibility-timeout restore (run by any worker) never re-delivers them."""
        now = time.time()
        with self.client.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.zadd(self.unacked_index, {tag: now}, xx=True)
            pipe.execute()

    def close(self) -> None:
        self.client.close()


def broker_redis(app: Celery) -> BrokerRedis | None:
    """The app broker's kombu Redis names and a client (close it); None when not Redis."""
    import redis

    with app.connection_for_read() as conn:
        if conn.transport.driver_type != "redis":
            return None
        channel = conn.default_channel
        pool = channel.client.connection_pool
        client = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **pool.connection_kwargs))
        prefix = channel.global_keyprefix or ""
        return BrokerRedis(
            client=client,
            prefix=prefix,
            unacked=prefix + channel.unacked_key,
            unacked_index=prefix + channel.unacked_index_key,
            sep=channel.sep,
            priority_steps=tuple(sorted(channel.priority_steps)),
        )


def _routing_key(raw: bytes | str) -> tuple[dict[str, Any], str] | None:
    try:
        payload, _exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return (payload, routing_key) if isinstance(payload, dict) else None


def unacked_by_queue(broker: BrokerRedis) -> dict[str, list[float]]:
    """Delivery times of the unacked messages, by queue (routing key). Read only."""
    entries = broker.client.hgetall(broker.unacked)
    scores = dict(broker.client.zrange(broker.unacked_index, 0, -1, withscores=True))
    found: dict[str, list[float]] = {}
    for tag, raw in entries.items():
        parsed = _routing_key(raw)
        if parsed is not None:
            found.setdefault(parsed[1], []).append(float(scores.get(tag, 0.0)))
    return found


def _priority(payload: dict[str, Any]) -> int:
    value = (payload.get("properties") or {}).get("priority")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _delivery_tag(payload: dict[str, Any]) -> str | None:
    tag = (payload.get("properties") or {}).get("delivery_tag")
    return str(tag) if tag is not None else None


def restore_unacked_to_head(broker: BrokerRedis, queue: str, in_transit: str | None = None) -> int:
    """Put ``queue``'s unacked messages back at its head in delivery order; return how many.

    Also the messages a dead worker had moved to the ``in_transit`` list (``fetch.py``)
    but not yet registered as unacked: they are newer than any registered one. A message in
    both places (killed between the two steps) goes back once. Other queues' entries are not
    touched. Atomic: the transaction is retried if anyone (kombu's own visibility restore,
    an ack) changes the keys meanwhile.
    """
    moved = 0
    watched = [broker.unacked, broker.unacked_index] + ([in_transit] if in_transit else [])

    def transaction(pipe: Any) -> None:
        nonlocal moved
        entries = pipe.hgetall(broker.unacked)
        scores = dict(pipe.zrange(broker.unacked_index, 0, -1, withscores=True))
        mine: list[tuple[float, bytes, dict[str, Any]]] = []
        for tag, raw in entries.items():
            parsed = _routing_key(raw)
            if parsed is not None and parsed[1] == queue:
                mine.append((float(scores.get(tag, 0.0)), tag, parsed[0]))
        mine.sort(key=lambda item: (item[0], item[1]))
        oldest_first = [payload for _score, _tag, payload in mine]
        known = {_delivery_tag(p) for p in oldest_first}
        # The in-transit list gets LPUSHed (BLMOVE ... LEFT): its oldest item is at the right.
        for raw in reversed(pipe.lrange(in_transit, 0, -1) if in_transit else []):
            try:
                payload = json.loads(raw)
            except ValueError:
                continue
            if isinstance(payload, dict) and _delivery_tag(payload) not in known:
                oldest_first.append(payload)
        pipe.multi()
        # BRPOP takes from the right: push the newest first, the oldest last (= next).
        for payload in reversed(oldest_first):
            with contextlib.suppress(KeyError, TypeError):
                payload["headers"]["redelivered"] = True
                payload["properties"]["delivery_info"]["redelivered"] = True
            pipe.rpush(broker.queue_list(queue, _priority(payload)), json.dumps(payload))
        for _score, tag, _payload in mine:
            pipe.hdel(broker.unacked, tag)
            pipe.zrem(broker.unacked_index, tag)
        if in_transit:
            pipe.delete(in_transit)
        moved = len(oldest_first)

    broker.client.transaction(transaction, *watched)
    return moved
