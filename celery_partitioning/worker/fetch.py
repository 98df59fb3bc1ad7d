"""Loss-free fetch on Redis: the partition worker moves a message out of its queue atomically.

kombu's Redis transport takes a message with ``BRPOP`` and only then records it in the
``unacked`` hash (``QoS.append``): a worker killed between the two loses the message for
good (a chaos test SIGKILLing busy workers lost 2 of 2,000 that way). A partition worker
consumes one queue, so its channel is switched to the reliable-queue pattern instead:
``BLMOVE queue in-transit RIGHT LEFT`` takes the message and parks it in a per-partition
list in one atomic step; it leaves that list in the same transaction that records it in
kombu's ``unacked`` hash and index (so the hand-over costs no round trip of its own; a
:data:`Register` may replace that transaction, e.g. to decide the parking gate in the same
script). Crash recovery (``recovery.restore_unacked_to_head``) puts both kinds back at the
head of the queue, deduplicated by delivery tag, oldest first.

Only the priority-0 list of the queue is read: partitioned messages have no priority (the
router and the registry check refuse one), so the other priority lists stay empty.
This patches two private members of kombu's Redis ``Channel`` (``_brpop_start`` and the
``BRPOP`` handler) and replaces its ``qos.append`` (kombu's ``MULTI ZADD HSET EXEC``, plus
the ``LREM``), on the partition worker's own channel only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic, time
from typing import Any

__all__ = ["Register", "Registration", "ReliableFetch", "install_reliable_fetch"]

logger = logging.getLogger("celery_partitioning.worker")

#: Attribute marking a channel this module already switched.
_MARK = "_celery_partitioning_reliable"


@dataclass(frozen=True)
class Registration:
    """A fetched message to record as unacked, and to take off the in-transit list, atomically.

    Names are complete (kombu's ``global_keyprefix`` included), for a plain client.
    """

    #: The kombu message (its ``headers``, ``_raw``...).
    message: Any
    delivery_tag: str
    #: kombu's ``unacked`` hash field value: JSON ``[payload, exchange, routing_key]``.
    entry: str
    #: Delivery time (kombu's ``unacked_index`` score).
    score: float
    unacked: str
    unacked_index: str
    in_transit: str
    #: The raw item to remove from ``in_transit`` (None: not fetched by us, nothing to remove).
    item: bytes | None

    def queue(self, pipe: Any) -> None:
        """Queue the commands on a MULTI pipeline (the caller executes it)."""
        pipe.zadd(self.unacked_index, {self.delivery_tag: self.score})
        pipe.hset(self.unacked, self.delivery_tag, self.entry)
        if self.item is not None:
            pipe.lrem(self.in_transit, 1, self.item)


#: Carries out one Registration in a single atomic step (see ``ReliableFetch.register``).
Register = Callable[[Registration], None]


@dataclass
class ReliableFetch:
    """The state of one switched channel."""

    channel: Any
    #: The queue's priority-0 list, with kombu's global key prefix.
    source: str
    #: The in-transit list (``RedisKeys.in_transit``), same Redis.
    in_transit: str
    queue: str
    #: A plain redis-py client to the broker (names above are complete).
    client: Any
    #: The raw item last moved and not yet registered as unacked.
    pending: bytes | None = None
    #: ``BLMOVE`` (Redis >= 6.2) or its older spelling ``BRPOPLPUSH``.
    command: str = "BLMOVE"
    #: kombu's unacked hash and index, complete names.
    unacked: str = "unacked"
    unacked_index: str = "unacked_index"
    #: Records a fetched message (None: :meth:`transaction`, kombu's own plus the LREM).
    register: Register | None = None

    def start(self, timeout: Any = None) -> None:
        channel = self.channel
        if timeout is None:
            timeout = channel.brpop_timeout
        queues = channel._queue_cycle.consume(len(channel.active_queues))
        if not queues:
            return
        channel._in_poll = channel.client.connection
        channel._brpop_sent_at = monotonic()
        if self.command == "BLMOVE":
            channel.client.connection.send_command(
                "BLMOVE", self.source, self.in_transit, "RIGHT", "LEFT", timeout or 0)
        else:
            channel.client.connection.send_command(
                "BRPOPLPUSH", self.source, self.in_transit, int(timeout or 0))

    def read(self, **options: Any) -> bool:
        from queue import Empty

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
            self.pending = item
            channel.connection._deliver(json.loads(item), self.queue)
            return True
        finally:
            channel._in_poll = None
            flush = getattr(channel, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def record(self, message: Any, delivery_tag: Any) -> None:
        """kombu's ``QoS.append``: the pending message goes from in-transit to unacked at once."""
        from kombu.utils.json import dumps

        item, self.pending = self.pending, None
        delivery = message.delivery_info
        registration = Registration(
            message=message, delivery_tag=delivery_tag,
            entry=dumps([message._raw, delivery["exchange"],  # type: ignore[no-untyped-call]
                         delivery["routing_key"]]),
            score=time(), unacked=self.unacked, unacked_index=self.unacked_index,
            in_transit=self.in_transit, item=item)
        (self.register or self.transaction)(registration)

    def transaction(self, registration: Registration) -> None:
        """The default Register: ``MULTI ZADD HSET LREM EXEC``, one round trip as kombu's."""
        with self.client.pipeline() as pipe:
            registration.queue(pipe)
            pipe.execute()


def _move_command(client: Any) -> str:
    version = str(client.info("server").get("redis_version", "0"))
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()] + [0, 0]
    return "BLMOVE" if (parts[0], parts[1]) >= (6, 2) else "BRPOPLPUSH"


def install_reliable_fetch(channel: Any, queue: str, in_transit: str, client: Any,
                           register: Register | None = None) -> bool:
    """Switch kombu Redis ``channel`` to BLMOVE-based fetching of ``queue``; False if not Redis.

    ``register`` replaces the transaction that records a fetched message as unacked (it must
    do what :meth:`Registration.queue` does, atomically).
    """
    if getattr(channel, _MARK, None) is not None:
        return True
    if not hasattr(channel, "_brpop_start") or not isinstance(getattr(channel, "handlers", None), dict):
        return False
    from kombu.transport.virtual.base import QoS as VirtualQoS

    prefix = getattr(channel, "global_keyprefix", "") or ""
    fetch = ReliableFetch(channel, prefix + channel._q_for_pri(queue, 0), in_transit, queue, client,
                          command=_move_command(client), unacked=prefix + channel.unacked_key,
                          unacked_index=prefix + channel.unacked_index_key, register=register)
    qos = channel.qos

    def append(message: Any, delivery_tag: Any) -> None:
        # kombu's redis QoS.append, with the in-transit LREM inside its transaction
        fetch.record(message, delivery_tag)
        VirtualQoS.append(qos, message, delivery_tag)  # type: ignore[no-untyped-call]

    channel._brpop_start = fetch.start
    channel.handlers["BRPOP"] = fetch.read
    qos.append = append
    setattr(channel, _MARK, fetch)
    return True
