"""kombu's Redis broker layout, and the partition's unacked messages in it: crash recovery.

kombu's Redis transport (``kombu/transport/redis.py``) keeps each delivered, not yet acked
message in the hash ``unacked`` (delivery tag → JSON ``[payload, exchange, routing_key]``)
and its delivery time in the sorted set ``unacked_index``, both under ``global_keyprefix``.
Publishing is ``LPUSH``, consuming ``BRPOP``: the head of a queue is the right end. After a
SIGKILL the message stays there until ``visibility_timeout`` (an hour by default) while a
restarted worker runs later messages; ``reject(requeue=True)`` would ``LPUSH`` it to the
back. So the new lease holder, before it consumes, moves the entries whose routing key is
its own queue (and only those) back with ``RPUSH``, newest first so the oldest ends up at
the head, in one transaction on both keys (as kombu's own ``restore_by_tag``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..message import UnackedEntry, decode_raw, delivery_tag_of, mark_redelivered, priority_of
from ..state import redis_client, redis_client_like, replicas_of, settings_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["BrokerRedis", "broker_redis", "restore_unacked_to_head", "unreachable_errors",
           "unacked_by_queue", "unblock", "fetch_name", "wake_fetches", "BROKER_SOCKET_TIMEOUT",
           "FETCH_TIMEOUT"]

#: Seconds any read or connect of the partitions' broker client may wait. A blocking fetch
#: waits at most ``FETCH_TIMEOUT`` on the server, so a longer silence is a peer gone without
#: a reset (a host failure, a master frozen mid-failover), which must not stall the partition.
BROKER_SOCKET_TIMEOUT: Final = 10.0
#: Longest wait of a blocking fetch on the server. A stop does not wait for it: it unblocks
#: the fetch (:func:`unblock`); the time-out only bounds an idle partition's polling (one
#: command per partition per ``FETCH_TIMEOUT``) and a stop whose unblock did not arrive.
FETCH_TIMEOUT: Final = 5.0


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
    #: ``BLMOVE`` or ``BRPOPLPUSH``, found on first use.
    _move: str | None = None

    def queue_list(self, queue: str, priority: int = 0) -> str:
        """The Redis list of ``queue`` for a priority (as kombu names it)."""
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

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What a lost or stalled connection to the broker raises."""
        return unreachable_errors()

    def fetch(self, queue: str, in_transit: str, timeout: float) -> bytes | None:
        """Take the head of ``queue`` into ``in_transit`` atomically, waiting up to ``timeout``
        seconds: ``BLMOVE ... RIGHT LEFT`` (``BRPOPLPUSH`` before Redis 6.2)."""
        if self._move is None:
            version = str(self.client.info("server").get("redis_version", "0"))
            parts = [int(p) for p in version.split(".")[:2] if p.isdigit()] + [0, 0]
            self._move = "BLMOVE" if (parts[0], parts[1]) >= (6, 2) else "BRPOPLPUSH"
        source = self.queue_list(queue)
        if self._move == "BLMOVE":
            item: bytes | None = self.client.blmove(source, in_transit, timeout, "RIGHT", "LEFT")
        else:
            item = self.client.brpoplpush(source, in_transit, max(1, int(timeout)))
        return item

    def name_connections(self, name: str) -> None:
        """Give every connection of this client the name ``name`` (``CLIENT SETNAME`` on
        connect), so that :func:`unblock` finds the one blocked in :meth:`fetch`."""
        pool = self.client.connection_pool
        pool.connection_kwargs["client_name"] = name
        pool.disconnect()  # the connections made before reconnect with the name

    def close(self) -> None:
        self.client.close()


#: How fetch connections' names begin (``CLIENT SETNAME``): ``cp-fetch:<pid>:<owner>:<queue>``.
_FETCH: Final = "cp-fetch"


def fetch_name(queue: str, owner: object) -> str:
    """The connection name of ``owner``'s fetches from ``queue`` (one per partition thread)."""
    return f"{_FETCH}:{os.getpid()}:{id(owner)}:{queue}"


def unblock(client: Any, names: set[str] | Callable[[str], bool]) -> int:
    """End the blocking commands (a fetch waits as if it timed out) of the connections named
    ``names``, or whose name ``names`` accepts (:meth:`BrokerRedis.name_connections`), on
    ``client``'s server, in two round trips; returns how many connections it found."""
    wanted = names if callable(names) else names.__contains__
    found = [entry["id"] for entry in client.client_list(_type="normal")
             if wanted(entry.get("name") or "")]
    if found:
        with client.pipeline(transaction=False) as pipe:
            for client_id in found:
                pipe.client_unblock(client_id)
            pipe.execute()
    return len(found)


def wake_fetches(client: Any, queue: str) -> int:
    """Unblock every partition thread's fetch from ``queue`` (whichever process holds it), so
    that it reads what an operator just wrote (a pause) now, not when its fetch times out."""
    return unblock(client, lambda name: name.startswith(f"{_FETCH}:")
                   and name.split(":", 3)[-1] == queue)


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a Redis (broker or store) that is gone or failing over raises: a lost or stalled
    connection, or ``READONLY`` from a demoted master that still answers."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ReadOnlyError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)


def broker_redis(app: Celery) -> BrokerRedis | None:
    """The app broker's kombu Redis names and a client (close it); None when not Redis. On
    Sentinel the client is the package's own ``master_for`` client, which follows a failover."""
    settings = settings_of(app)
    replicas = replicas_of(settings)
    with app.connection_for_read() as conn:
        if conn.transport.driver_type != "redis":
            return None
        channel = conn.default_channel
        prefix = channel.global_keyprefix or ""
        target = settings.broker_redis
        client = (redis_client(target, replicas=replicas, timeout=BROKER_SOCKET_TIMEOUT)
                  if target is not None and target.is_sentinel
                  else redis_client_like(channel.client.connection_pool, replicas=replicas,
                                         timeout=BROKER_SOCKET_TIMEOUT))
        return BrokerRedis(
            client=client,
            prefix=prefix,
            unacked=prefix + channel.unacked_key,
            unacked_index=prefix + channel.unacked_index_key,
            sep=channel.sep,
            priority_steps=tuple(sorted(channel.priority_steps)),
        )


def unacked_by_queue(broker: BrokerRedis) -> dict[str, list[float]]:
    """Delivery times of the unacked messages, by queue (routing key). Read only."""
    found: dict[str, list[float]] = {}
    for delivered, _tag, entry in _unacked(broker.client, broker):
        found.setdefault(entry.routing_key, []).append(delivered)
    return found


def _unacked(reader: Any, broker: BrokerRedis) -> list[tuple[float, bytes, UnackedEntry]]:
    """Every unacked message (delivery time, tag, entry) that parses, in delivery order;
    ``reader``: a client, or a pipeline watching both keys."""
    entries = reader.hgetall(broker.unacked)
    scores = dict(reader.zrange(broker.unacked_index, 0, -1, withscores=True))
    return sorted(((float(scores.get(tag, 0.0)), tag, entry) for tag, raw in entries.items()
                   if (entry := UnackedEntry.parse(raw)) is not None),
                  key=lambda item: (item[0], item[1]))


def restore_unacked_to_head(broker: BrokerRedis, queue: str, in_transit: str | None = None) -> int:
    """Put ``queue``'s unacked messages back at its head in delivery order; return how many.

    Also the messages of the ``in_transit`` list (fetched, not yet registered as unacked: newer
    than any registered one; a message in both goes back once; one that is no message goes back
    unchanged, to be dead-lettered when fetched). Other queues' entries are not touched. One
    transaction, run again if anyone (kombu's visibility restore, an ack) changes the keys.
    """
    watched = [broker.unacked, broker.unacked_index] + ([in_transit] if in_transit else [])

    def transaction(pipe: Any) -> int:
        mine = [item for item in _unacked(pipe, broker) if item[2].routing_key == queue]
        oldest_first: list[tuple[int, str | bytes]] = []
        for _score, _tag, entry in mine:
            mark_redelivered(entry.message)
            oldest_first.append((entry.priority, json.dumps(entry.message)))
        known = {delivery_tag_of(entry.message) for _s, _t, entry in mine}
        # The in-transit list gets LPUSHed (BLMOVE ... LEFT): its oldest item is at the right.
        for raw in reversed(pipe.lrange(in_transit, 0, -1) if in_transit else []):
            payload = decode_raw(raw)
            if payload is None:
                oldest_first.append((0, raw))
            elif delivery_tag_of(payload) not in known:
                mark_redelivered(payload)
                oldest_first.append((priority_of(payload), json.dumps(payload)))
        pipe.multi()
        # BRPOP takes from the right: push the newest first, the oldest last (= next).
        for priority, item in reversed(oldest_first):
            pipe.rpush(broker.queue_list(queue, priority), item)
        for _score, tag, _entry in mine:
            pipe.hdel(broker.unacked, tag)
            pipe.zrem(broker.unacked_index, tag)
        if in_transit:
            pipe.delete(in_transit)
        return len(oldest_first)

    moved: int = broker.client.transaction(transaction, *watched, value_from_callable=True)
    return moved
