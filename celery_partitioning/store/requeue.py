"""How a message the store set aside goes back to its partition queue: one strategy per partition.

Parking, backoff, replay, skip and resize all put messages back ahead of anything newer:

* :class:`HeadPush` (the broker is the store's Redis): the script itself pushes them onto the
  consuming end of kombu's list of the queue.
* :class:`ThroughOutbox` (any other broker): the script appends them to an outbox list, and
  :meth:`Requeue.send` publishes it to the tail of the queue, oldest first; the key stays held
  until every message is back, so nothing newer overtakes them.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..config import RedisTarget
from ..message import Publish, publisher
from ..state import settings_of
from .keys import RedisKeys, outbox_lock
from .letters import as_text
from .scripts import script_for

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["HEAD_PUSH", "HeadPush", "Requeue", "ThroughOutbox", "pushes_to_head", "requeue_for",
           "send_outbox"]


#: How long a sender holds an outbox without renewing its claim (ms): a sender that died
#: holding it blocks others no longer than this.
SENDING_MS: Final = 10_000


def send_outbox(client: Any, outbox: str, publish: Publish) -> int:
    """Publish the messages of the Redis list ``outbox``, oldest first, each leaving the list once
    sent (at least once: a crash between the two re-sends it).

    One sender at a time, or a message could go twice: a sender claims the outbox (``SET NX``
    with a TTL); another finds it claimed and returns, the claimant sending what was appended
    meanwhile too (it looks again after letting go)."""
    lock, sent = outbox_lock(outbox), 0
    while True:
        token = secrets.token_hex(8)
        if not client.set(lock, token, nx=True, px=SENDING_MS):
            return sent
        try:
            while (raw := client.lindex(outbox, 0)) is not None:
                publish(as_text(raw))
                client.lpop(outbox)
                sent += 1
                if sent % 100 == 0:
                    client.pexpire(lock, SENDING_MS)
        finally:
            _let_go(client, lock, token)
        if not client.llen(outbox):
            return sent


def _let_go(client: Any, lock: str, token: str) -> None:
    """Drop the claim ``lock`` if it is still ``token``'s (it may have expired and been taken)."""
    script_for(client, "lease_release")(keys=[lock], args=[token])  # compare-and-delete


class Requeue(ABC):
    """How re-queued messages reach their partition queue (see the module docstring)."""

    #: True: the store's script pushes them onto the head itself; False: through an outbox.
    at_head: bool

    @abstractmethod
    def head(self, keys: RedisKeys, queue: str) -> str:
        """The Redis list a script pushes re-queued messages of ``queue`` onto, or ``""``
        when they go to an outbox instead (a script KEYS slot)."""

    @abstractmethod
    def send(self, client: Any, outbox: str) -> int:
        """Publish what a script left in ``outbox``; returns how many were sent."""


@dataclass(frozen=True)
class HeadPush(Requeue):
    """The broker is the store's Redis: scripts push onto the head of the queue's list."""

    at_head = True

    def head(self, keys: RedisKeys, queue: str) -> str:
        return keys.broker_queue(queue)

    def send(self, client: Any, outbox: str) -> int:
        return 0  # nothing is ever left in an outbox


@dataclass(frozen=True)
class ThroughOutbox(Requeue):
    """Any other broker: re-queued messages wait in the store's outbox and are published to the
    tail of the queue by ``publish`` (one producer: they arrive in the order sent). Use it
    from one thread: ``publish`` holds one connection. Another process sending the same
    outbox meanwhile leaves it to the one that claimed it (:func:`send_outbox`)."""

    at_head = False
    publish: Publish

    def head(self, keys: RedisKeys, queue: str) -> str:
        return ""

    def send(self, client: Any, outbox: str) -> int:
        return send_outbox(client, outbox, self.publish)


def pushes_to_head(app: Celery) -> bool:
    """Whether re-queued messages can be pushed onto the head of the queue's Redis list in the
    store's own script: the broker is the Redis that holds the store."""
    settings = settings_of(app)
    store = settings.redis
    if store is None:
        return False
    with app.connection_for_write() as conn:
        driver = conn.transport.driver_type
        broker = conn.as_uri(include_password=True)
    # Sentinel: the settings name the broker's sentinels; otherwise the live broker's address
    live = settings.broker_redis if store.is_sentinel else RedisTarget(url=broker)
    return driver == "redis" and store.same_server(live)


def requeue_for(app: Celery, pool: str, index: int, *, at_head: bool | None = None) -> Requeue:
    """The :class:`Requeue` of partition ``index`` of ``pool``. ``at_head``: what
    :func:`pushes_to_head` says (the same for every partition of an app: pass it to ask once)."""
    if at_head is None:
        at_head = pushes_to_head(app)
    return HeadPush() if at_head else ThroughOutbox(publisher(app, pool, index))


#: The default of the store's methods: the broker is the store's Redis.
HEAD_PUSH: Final = HeadPush()
