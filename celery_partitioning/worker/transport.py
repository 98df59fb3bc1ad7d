"""Loss-free fetch on Redis: kombu's Redis transport, subclassed, moves a message atomically.

kombu's Redis transport takes a message with ``BRPOP`` and only then records it in the
``unacked`` hash (``QoS.append``): a worker killed between the two loses the message for
good (a chaos test SIGKILLing busy workers lost 2 of 2,000 that way). A partition worker
consumes one queue, so its channel uses the reliable-queue pattern instead:
``BLMOVE queue in-transit RIGHT LEFT`` takes the message and parks it in a per-partition
list in one atomic step; it leaves that list in the same transaction that records it in
kombu's ``unacked`` hash and index (so the hand-over costs no round trip of its own; a
``Register`` may replace that transaction, e.g. to decide the parking gate in the same
script). Crash recovery (``store.broker.restore_unacked_to_head``) puts both kinds back at
the head of the queue, deduplicated by delivery tag, oldest first. An item that is not a
kombu message at all is handed to ``on_malformed`` (a dead letter) instead of crashing the
consumer, and leaves the in-transit list only once stored.

The partition worker selects these transports by dotted path (``broker_transport``), as
kombu's own ``SentinelTransport`` extends its ``Transport``; a channel behaves exactly as
kombu's until :func:`enable_reliable_fetch` is called on it. Only the priority-0 list is
read: partitioned messages have no priority (the router and the registry check refuse one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty
from time import monotonic, time
from typing import Any, Final

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from .. import compat
from ..message import envelope_problem
from ..store.broker import Register, Registration

__all__ = ["ReliableFetch", "RedisTransport", "SentinelTransport", "enable_reliable_fetch",
           "TRANSPORTS"]

logger = logging.getLogger("celery_partitioning.worker")

#: Attribute of a channel whose reliable fetch is on.
_FETCH: Final = "_celery_partitioning_fetch"

#: Called with a raw item that is not a kombu message and why; it stores it (dead letter)
#: and takes it off the in-transit list.
OnMalformed = Callable[[bytes, str], None]


@dataclass
class ReliableFetch:
    """The loss-free fetch of one channel."""

    channel: Any
    #: The queue's priority-0 list, with kombu's global key prefix.
    source: str
    #: The in-transit list (``RedisKeys.in_transit``), same Redis.
    in_transit: str
    queue: str
    #: A plain redis-py client to the broker (names above are complete).
    client: Any
    on_malformed: OnMalformed
    #: The raw item last moved and not yet registered as unacked.
    pending: bytes | None = None
    #: ``BLMOVE`` (Redis >= 6.2) or its older spelling ``BRPOPLPUSH``.
    command: str = "BLMOVE"
    #: kombu's unacked hash and index, complete names.
    unacked: str = "unacked"
    unacked_index: str = "unacked_index"
    #: Records a fetched message (None: :meth:`transaction`, kombu's own plus the LREM).
    register: Register | None = None

    def start(self, timeout: Any) -> None:
        channel = self.channel
        if not compat.next_queues(channel):
            return
        compat.start_poll(channel, monotonic())
        connection = channel.client.connection
        if self.command == "BLMOVE":
            connection.send_command("BLMOVE", self.source, self.in_transit, "RIGHT", "LEFT",
                                    timeout or 0)
        else:
            connection.send_command("BRPOPLPUSH", self.source, self.in_transit, int(timeout or 0))

    def read(self, **options: Any) -> bool:
        channel = self.channel
        try:
            try:
                item = channel.client.parse_response(channel.client.connection, self.command,
                                                     **options)
            except channel.connection_errors:
                channel.client.connection.disconnect()
                raise
            if not item:
                raise Empty()
            problem = envelope_problem(item)
            if problem is not None:
                self.on_malformed(item, problem)
                raise Empty()
            self.pending = item
            compat.deliver(channel, json.loads(item), self.queue)
            return True
        finally:
            compat.end_poll(channel)

    def record(self, message: Any, delivery_tag: Any) -> None:
        """kombu's ``QoS.append``: the pending message goes from in-transit to unacked at once."""
        item, self.pending = self.pending, None
        delivery = message.delivery_info
        registration = Registration(
            message=message, delivery_tag=delivery_tag,
            entry=dumps([compat.kombu_payload(message),  # type: ignore[no-untyped-call]
                         delivery["exchange"], delivery["routing_key"]]),
            score=time(), unacked=self.unacked, unacked_index=self.unacked_index,
            in_transit=self.in_transit, item=item)
        (self.register or self.transaction)(registration)

    def transaction(self, registration: Registration) -> None:
        """The default Register: ``MULTI ZADD HSET LREM EXEC``, one round trip as kombu's."""
        with self.client.pipeline() as pipe:
            registration.queue(pipe)
            pipe.execute()


def _fetch_of(channel: Any) -> ReliableFetch | None:
    fetch: ReliableFetch | None = getattr(channel, _FETCH, None)
    return fetch


Channel = compat.redis_channel_class(kombu_redis.Channel, "Channel", _fetch_of)
SentinelChannel = compat.redis_channel_class(kombu_redis.SentinelChannel, "SentinelChannel",
                                             _fetch_of)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport whose channels can fetch loss-free."""

    Channel = Channel  # type: ignore[assignment]


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport whose channels can fetch loss-free."""

    Channel = SentinelChannel  # type: ignore[assignment]


#: URL scheme of a broker → the dotted path of the transport a partition worker uses.
TRANSPORTS: Final = {
    "redis": f"{__name__}:RedisTransport",
    "rediss": f"{__name__}:RedisTransport",
    "sentinel": f"{__name__}:SentinelTransport",
}


def _move_command(client: Any) -> str:
    version = str(client.info("server").get("redis_version", "0"))
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()] + [0, 0]
    return "BLMOVE" if (parts[0], parts[1]) >= (6, 2) else "BRPOPLPUSH"


def enable_reliable_fetch(channel: Any, queue: str, in_transit: str, client: Any, *,
                          on_malformed: OnMalformed, register: Register | None = None) -> None:
    """Switch a channel of :class:`RedisTransport` to BLMOVE-based fetching of ``queue``.

    ``register`` replaces the transaction that records a fetched message as unacked (it must
    do what ``Registration.queue`` does, atomically). Raises ``TypeError`` for a channel of
    another transport: the worker must not run without the loss-free fetch.
    """
    if getattr(channel, _FETCH, None) is not None:
        return
    if not isinstance(channel, (Channel, SentinelChannel)):
        raise TypeError(f"the partition queue's channel is a {type(channel).__module__}."
                        f"{type(channel).__qualname__}, not celery-partitioning's Redis channel "
                        "(was broker_transport changed after the worker started?)")
    redis_channel: Any = channel
    prefix = redis_channel.global_keyprefix or ""
    fetch = ReliableFetch(redis_channel, compat.queue_list_name(redis_channel, queue), in_transit,
                          queue, client, on_malformed, command=_move_command(client),
                          unacked=prefix + redis_channel.unacked_key,
                          unacked_index=prefix + redis_channel.unacked_index_key,
                          register=register)
    setattr(channel, _FETCH, fetch)
