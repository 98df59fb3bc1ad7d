"""The channel of a message a partition thread fetched from Redis (``partition.py``).

The fetch moved the message into the partition's in-transit list; acking it takes it off that
list, and a requeue puts it back at the head of the queue, both in one step, so a crash at
any moment leaves it in exactly one of the two lists.
"""

from __future__ import annotations

from typing import Any

from .. import compat

__all__ = ["RedisAck"]


class RedisAck:
    """The channel of a message fetched from Redis: its ack takes it off the in-transit list."""

    no_ack_consumers = None

    def __init__(self, client: Any, in_transit: str, source: str, item: bytes) -> None:
        self.client = client
        self.in_transit = in_transit
        self.source = source
        self.item = item
        #: The ack could not reach Redis (a failover): the thread retries it before it fetches
        #: again, so a message that ran never comes back behind later ones.
        self.ack_pending = False

    def basic_ack(self, delivery_tag: Any = None, multiple: bool = False) -> None:
        self.ack_pending = True
        self.client.lrem(self.in_transit, 1, self.item)
        self.ack_pending = False

    def basic_reject(self, delivery_tag: Any = None, requeue: bool = False) -> None:
        if not requeue:
            self.basic_ack(delivery_tag)
            return
        self.to_head()

    def to_head(self) -> None:
        """Back to the head of the queue (consumed next), in one transaction."""
        with self.client.pipeline() as pipe:
            pipe.lrem(self.in_transit, 1, self.item)
            pipe.rpush(self.source, self.item)
            pipe.execute()

    def decode_body(self, body: Any, encoding: Any = None) -> Any:
        return compat.decode_virtual_body(body, encoding)
