"""The outbox relay: committed outbox rows to the broker, in id order, then deleted.

One relay is active per database: it holds a lease in the Redis store (``lease_name``); a
second one waits as a standby and takes over within ``partitioning_lease_ttl`` after the
holder dies. Rounds repeat at once while full batches come back; idle, the relay waits for
PostgreSQL's ``NOTIFY`` (sent by the outbox insert), else polls.

A crash between publish and delete publishes those rows again, same task ids, before any
later row: tasks with ``checkpoint=`` skip the repeats, others run them twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from django.db import connections
from kombu.entity import Exchange, Queue

from ...delivery import Outgoing, deliver
from ...errors import PublishManyError
from ...state import redis_client, redis_keys, settings_of
from ...store.lease import Lease
from .outbox import NOTIFY_CHANNEL, SUPPORTED_VENDORS

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Relay", "RelayStats", "OutboxStatus", "DEFAULT_BATCH", "DEFAULT_POLL", "lease_name",
           "outbox_databases", "outbox_status", "setup_django"]

logger = logging.getLogger("celery_partitioning.outbox")

#: Rows read, published and deleted per round.
DEFAULT_BATCH: Final = 500

#: The outbox columns a round reads, in the order ``Relay._message`` unpacks them.
_COLUMNS: Final = ("id", "task_name", "task_id", "exchange", "routing_key", "declare", "headers",
                   "properties", "body", "content_type", "content_encoding", "compression",
                   "delivery_mode")

#: Seconds between two looks at an idle outbox (SQLite; on PostgreSQL the longest wait
#: for a ``NOTIFY`` before looking anyway).
DEFAULT_POLL: Final = 0.5


def setup_django() -> None:
    """``django.setup()`` unless the app module (or the caller) did it already."""
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()


def lease_name(alias: str) -> str:
    """The lease's name under ``RedisKeys.lease``: one relay per database."""
    name = connections[alias].settings_dict.get("NAME") or ""
    return f"outbox:{alias}:{name}"


def outbox_databases() -> list[str]:
    """The aliases of the databases holding the outbox table, when this process runs Django
    with ``celery_partitioning.contrib.django`` installed; [] otherwise."""
    from django.apps import apps
    from django.conf import settings
    from django.db import DatabaseError

    if not (settings.configured and apps.ready
            and apps.is_installed("celery_partitioning.contrib.django")):
        return []
    from .models import OutboxMessage

    found = []
    for alias in connections:
        connection = connections[alias]
        if connection.vendor not in SUPPORTED_VENDORS:
            continue
        try:
            with connection.cursor() as cursor:
                tables = connection.introspection.table_names(cursor)
        except DatabaseError as exc:
            logger.warning("outbox relay: cannot list the tables of database %r (%s); no "
                           "relay for it", alias, exc)
            continue
        finally:
            connection.close()  # this thread is not the relay's: keep no idle connection
        if OutboxMessage._meta.db_table in tables:
            found.append(alias)
    return found


@dataclass
class OutboxStatus:
    """What ``partitioning outbox status`` shows of one database's outbox."""

    database: str
    waiting: int
    oldest_age: float | None  # seconds since the oldest waiting row was stored
    relay: str | None  # the active relay ("node (pid N)"), None when no relay holds the lease


def outbox_status(app: Celery, using: str = "default") -> OutboxStatus:
    """Rows waiting, the oldest one's age, and the active relay (read only)."""
    from django.db.models import Count, Min
    from django.utils import timezone

    from ...store.lease import parse_holder
    from .models import OutboxMessage

    found = OutboxMessage.objects.using(using).aggregate(n=Count("id"), oldest=Min("created_at"))
    oldest = found["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest is not None else None
    relay = None
    settings = settings_of(app)
    if settings.redis is not None:
        client = redis_client(settings.redis)
        try:
            holder = parse_holder(client.get(redis_keys(app).lease(lease_name(using))))
        finally:
            client.close()
        relay = holder.describe() if holder is not None else None
    return OutboxStatus(using, int(found["n"]), age, relay)


@dataclass
class RelayStats:
    published: int = 0
    rounds: int = 0


class Relay:
    """Publishes the committed rows of one database's outbox."""

    def __init__(self, app: Celery, *, using: str = "default", batch: int = DEFAULT_BATCH,
                 poll: float = DEFAULT_POLL, stop: threading.Event | None = None,
                 token: str | None = None, takeover: str | None = None) -> None:
        """``token``/``takeover``: the lease's (``store/lease.py``), so a restarted process takes
        its predecessor's lease over at once."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.app = app
        self.using = using
        self.batch = batch
        self.poll = poll
        self.stop = stop or threading.Event()
        self.stats = RelayStats()
        self._listening = False
        self._queues: dict[str, tuple[dict[str, Any], Queue]] = {}
        self._retry_policy = dict(app.conf.task_publish_retry_policy or {})
        self._can_listen = True
        self._token, self._takeover = token, takeover

    # ---- one round ---------------------------------------------------------------------

    def relay_once(self) -> int:
        """Publish up to ``batch`` committed rows in id order, as captured, in one broker round
        trip (``delivery.deliver``), then delete the confirmed ones. Returns the rows read."""
        from .models import OutboxMessage

        rows = list(OutboxMessage.objects.using(self.using).order_by("id")
                    .values_list(*_COLUMNS)[: self.batch])
        if not rows:
            self.stats.rounds += 1
            return 0
        messages = [self._message(row) for row in rows]
        try:
            deliver(self.app, messages, len(messages), self._retry_policy)
        except PublishManyError as exc:
            # What the broker confirmed is deleted; the rest is published again, same ids.
            self._delete([rows[position][0] for position in exc.published])
            raise
        self._delete([row[0] for row in rows])
        self.stats.rounds += 1
        return len(rows)

    def _delete(self, ids: list[int]) -> None:
        from .models import OutboxMessage

        if ids:
            OutboxMessage.objects.using(self.using).filter(id__in=ids).delete()
            self.stats.published += len(ids)

    def _queue(self, declaration: dict[str, Any]) -> Queue:
        """The kombu Queue a row declares (cached: one object per queue, declared once per
        connection as ``apply_async`` does)."""
        name = declaration["name"]
        cached = self._queues.get(name)
        if cached is not None and cached[0] == declaration:
            return cached[1]
        options = {k: v for k, v in declaration.items() if v is not None}
        options.pop("name")
        options.pop("bindings", None)
        exchange = options.pop("exchange", None) or {}
        queue = Queue(name, exchange=Exchange(**{k: v for k, v in exchange.items()
                                                if v is not None}), **options)
        self._queues[name] = (declaration, queue)
        return queue

    def _message(self, row: tuple[Any, ...]) -> Outgoing:
        """A row as the message ``publish_many`` sends: what ``outbox.publish`` captured,
        unchanged (same task id); its publish signals fired at that call already."""
        (_id, name, task_id, exchange, routing_key, declare, headers, properties, body,
         content_type, content_encoding, compression, delivery_mode) = row
        return Outgoing(
            name=name, task_id=task_id,
            queue=self._queue(declare) if declare else None, exchange=exchange,
            routing_key=routing_key, delivery_mode=delivery_mode, headers=headers,
            properties=properties, raw_body=None, body=bytes(body), content_type=content_type,
            content_encoding=content_encoding, serializer="", compression=compression or None,
            sent_event=None, ignore_result=False, template=None, extra=None, announced=True)

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Take the lease (standby until then), then relay until ``stop`` is set."""
        settings = settings_of(self.app)
        if settings.redis is None:
            from ...errors import PartitionConfigError

            raise PartitionConfigError(
                "the outbox relay keeps its lease in the Redis store: set "
                "partitioning_redis_url (or use a Redis broker)")
        client = redis_client(settings.redis)
        lease = Lease(client, redis_keys(self.app).lease(lease_name(self.using)),
                      settings.lease_ttl, node=f"outbox-relay@{self.using}",
                      token=self._token, takeover=self._takeover)
        try:
            if not lease.acquire(self.stop.is_set, label=f"outbox relay ({self.using})"):
                return
            lease.start_heartbeat()
            logger.info("outbox relay (%s): lease taken; relaying", self.using)
            self._relay_until_stopped()
        finally:
            lease.release()
            client.close()
            connections[self.using].close()

    def _relay_until_stopped(self) -> None:
        while not self.stop.is_set():
            try:
                while not self.stop.is_set():
                    if self.relay_once() < self.batch:
                        self._wait()
            except Exception:
                if self.stop.is_set():
                    return
                logger.exception("outbox relay (%s): publishing failed; retrying in 1 s",
                                 self.using)
                connections[self.using].close()
                self._listening = False
                self.stop.wait(1.0)

    def _wait(self) -> None:
        """Until a transaction that wrote to the outbox commits, or ``poll`` seconds."""
        connection = connections[self.using]
        if connection.vendor != "postgresql" or not self._can_listen:
            self.stop.wait(self.poll)
            return
        connection.ensure_connection()
        raw = connection.connection
        if not _has_notifies_timeout(raw):
            # psycopg2, or psycopg 3 before 3.2 (no notifies(timeout=)): poll instead.
            logger.info("outbox relay (%s): the driver cannot wait for NOTIFY with a timeout; "
                        "polling every %ss", self.using, self.poll)
            self._can_listen = False
            return
        if not self._listening:
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._listening = True
            return  # a row committed before LISTEN would be missed: look once more first
        deadline = time.monotonic() + max(self.poll, 5.0)
        while not self.stop.is_set() and time.monotonic() < deadline:
            # Short slices, so a stop request is seen within a quarter second.
            if any(True for _ in raw.notifies(timeout=0.25, stop_after=1)):
                return


def _has_notifies_timeout(raw: Any) -> bool:
    """Whether ``raw`` (the DB-API connection) is psycopg >= 3.2: ``notifies(timeout=...)``."""
    import inspect

    notifies = getattr(raw, "notifies", None)
    if not callable(notifies):
        return False
    try:
        return "timeout" in inspect.signature(notifies).parameters
    except (TypeError, ValueError):
        return False
