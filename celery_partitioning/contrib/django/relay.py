"""The outbox relay: committed outbox rows to the broker, in id order, then deleted.

One relay is active per database: it holds a lease in the Redis store (``store/lease.py``,
key ``RedisKeys.lease("outbox:<alias>:<database name>")``) and a second relay waits as a
standby, taking over within ``partitioning_lease_ttl`` after the holder dies. A holder
that cannot renew its lease ends its process (the lease's fence), so two relays never
publish at once for long.

A loop: read up to ``batch`` rows in id order, publish each as it was captured (same
exchange, routing key, headers, properties, body: same task id), wait for the broker's
confirmation (RabbitMQ publisher confirms; on Redis the ``LPUSH`` reply), delete the
confirmed rows, repeat. Idle: PostgreSQL ``LISTEN`` (the outbox insert sends ``NOTIFY`` in
its transaction), else a poll every ``poll`` seconds.

Crash between publish and delete: the next relay publishes those rows again, with the same
task ids, before any later row. Tasks with ``checkpoint=`` skip the repeats (a position at
or below the checkpoint); other tasks run them twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from django.db import connections
from kombu.entity import Exchange, Queue

from ...state import redis_client, redis_keys, settings_of
from ...store.lease import Lease
from .outbox import NOTIFY_CHANNEL

if TYPE_CHECKING:
    from celery import Celery

    from .models import OutboxMessage

__all__ = ["Relay", "RelayStats", "OutboxStatus", "DEFAULT_BATCH", "DEFAULT_POLL", "lease_name",
           "outbox_status", "setup_django"]

logger = logging.getLogger("celery_partitioning.outbox")

#: Rows read, published and deleted per round.
DEFAULT_BATCH: Final = 500

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
                 poll: float = DEFAULT_POLL, stop: threading.Event | None = None) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.app = app
        self.using = using
        self.batch = batch
        self.poll = poll
        self.stop = stop or threading.Event()
        self.stats = RelayStats()
        self._listening = False
        self._queues: dict[str, Queue] = {}
        self._can_listen = True

    # ---- one round ---------------------------------------------------------------------

    def relay_once(self, producer: Any) -> int:
        """Publish up to ``batch`` committed rows in id order; delete the confirmed ones."""
        from .models import OutboxMessage

        rows = list(OutboxMessage.objects.using(self.using).order_by("id")[: self.batch])
        confirmed: list[int] = []
        try:
            for row in rows:
                self._publish(producer, row)
                confirmed.append(row.id)
        finally:
            if confirmed:
                OutboxMessage.objects.using(self.using).filter(id__in=confirmed).delete()
                self.stats.published += len(confirmed)
        self.stats.rounds += 1
        return len(rows)

    def _queue(self, declaration: dict[str, Any]) -> Queue:
        """The kombu Queue a row declares (cached: kombu declares it once per channel)."""
        name = declaration["name"]
        queue = self._queues.get(name)
        if queue is None or queue.as_dict(recurse=True) != declaration:
            options = {k: v for k, v in declaration.items() if v is not None}
            options.pop("name")
            options.pop("bindings", None)
            exchange = options.pop("exchange", None) or {}
            queue = self._queues[name] = Queue(
                name, exchange=Exchange(**{k: v for k, v in exchange.items() if v is not None}),
                **options)
        return queue

    def _publish(self, producer: Any, row: OutboxMessage) -> None:
        queue = self._queue(row.declare) if row.declare else None
        producer.publish(
            bytes(row.body), exchange=row.exchange, routing_key=row.routing_key,
            headers=dict(row.headers), content_type=row.content_type,
            content_encoding=row.content_encoding, compression=row.compression or None,
            delivery_mode=row.delivery_mode, declare=[queue] if queue is not None else [],
            retry=True, retry_policy=self.app.conf.task_publish_retry_policy,
            **row.properties)

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
                      settings.lease_ttl, node=f"outbox-relay@{self.using}")
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
        transport_options: dict[str, Any] = {}
        with self.app.connection_for_write() as probe:  # no I/O: the transport's type
            if probe.transport.driver_type == "amqp":
                transport_options["confirm_publish"] = True  # publish returns once confirmed
        while not self.stop.is_set():
            try:
                with self.app.connection_for_write(transport_options=transport_options) as conn:
                    producer = conn.Producer(auto_declare=False)
                    while not self.stop.is_set():
                        if self.relay_once(producer) < self.batch:
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
