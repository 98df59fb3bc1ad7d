"""Partition status, read only: depth, unacked, oldest age, consumer, parked keys per partition.

Redis broker: depth, unacked (kombu's ``unacked`` entries and the in-transit list), the
oldest age (oldest delivery, or the head's ``partition_published_at``) and the lease holder.
RabbitMQ: depth and consumers from a passive declare; unacked and ages are unknown (None).
Parked keys, backoffs and pauses come from the Redis store when one is configured.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from ..hashing import partition_for
from ..router import HEADER_PUBLISHED_AT
from ..state import redis_keys, settings_of, store_client
from ..store.backoff import BackoffStore
from ..store.broker import BrokerRedis, broker_redis, unacked_by_queue
from ..store.deadletters import DeadLetterStore
from ..store.keys import RedisKeys
from ..store.lease import read_holders
from ..store.pausing import Pause, PauseStore
from ..store.progress import read_progress
from .common import declared, table

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["PartitionStatus", "collect_pauses", "collect_status", "render_pauses", "render_table",
           "status_json", "STALL_AFTER"]

#: Default seconds a holder may go without taking a message while its queue has some before
#: ``status`` calls its partition stalled (a task running longer than this counts too).
STALL_AFTER: Final = 60.0


@dataclass
class PartitionStatus:
    """What ``celery partitioning status`` shows for one partition."""

    pool: str
    index: int
    queue: str
    #: Messages waiting (None when the queue cannot be read).
    depth: int | None
    #: Messages delivered and not acked yet (None when unknowable, e.g. over AMQP).
    unacked: int | None
    #: Seconds since the oldest message of the partition was published / delivered.
    oldest_age: float | None
    #: ``host (pid N)`` of the lease holder, ``"N consumer(s)"`` on AMQP, else None.
    consumer: str | None
    #: Keys of this partition parked behind a dead letter.
    parked_keys: int
    #: Keys of this partition waiting out a retry backoff (their messages set aside).
    backoff_keys: int = 0
    #: When the first of them is due (epoch s), None when none waits.
    backoff_next_due: float | None = None
    #: Seconds since the lease holder last took a message off the queue (or started
    #: consuming); None without a holder that records it.
    last_consumed_age: float | None = None
    #: The holder has not consumed for longer than the threshold while messages wait.
    stalled: bool = False
    #: Keys of this partition an operator paused (their messages set aside).
    paused_keys: int = 0
    #: The operator's pause of the partition (by, at, and the holder that stopped for it:
    #: stopped_by, stopped_at), None when it is not paused.
    paused: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _head_age(broker: BrokerRedis, queue: str, now: float) -> float | None:
    for name in broker.queue_lists(queue):
        raw = broker.client.lindex(name, -1)
        if raw is None:
            continue
        try:
            published = json.loads(raw).get("headers", {}).get(HEADER_PUBLISHED_AT)
        except (ValueError, AttributeError):
            return None
        return max(0.0, now - float(published)) if isinstance(published, (int, float)) else None
    return None


def collect_pauses(app: Celery, pools: Sequence[str] = ()) -> list[Pause]:
    """Every pause in force of ``pools`` (default all): partitions first, then keys."""
    with store_client(app) as client:
        if client is None:
            return []
        return PauseStore(DeadLetterStore(client, redis_keys(app))).paused(
            list(pools) or list(settings_of(app).pools))


def collect_status(app: Celery, pools: Sequence[str] = (),
                   stall_after: float = STALL_AFTER) -> list[PartitionStatus]:
    """One PartitionStatus per partition of ``pools`` (default all), pool order then index;
    a partition is *stalled* when its holder took no message for ``stall_after`` seconds
    while its queue has some."""
    settings = settings_of(app)
    chosen = list(pools) or list(settings.pools)
    rows = [PartitionStatus(p, i, settings.queue_name(p, i), None, None, None, None, 0)
            for p in chosen for i in range(settings.partitions(p))]
    consumed: dict[str, float | None] = {}
    with store_client(app) as client:
        if client is not None:
            consumed = _from_store(app, client, rows)
    broker = broker_redis(app)
    if broker is not None:
        try:
            _from_broker(broker, redis_keys(app), rows, consumed, stall_after)
        finally:
            broker.close()
    else:
        with app.connection_for_read() as conn:
            for row in rows:
                row.depth, consumers = declared(conn, row.queue) or (None, None)
                row.consumer = f"{consumers} consumer(s)" if consumers else None
    return _with_pauses(rows, collect_pauses(app, chosen))


def _from_store(app: Celery, client: Any, rows: list[PartitionStatus]) -> dict[str, float | None]:
    """Parked keys, backoffs and lease holder (the consumer) of each row; returns when each
    queue's holder last consumed (epoch s)."""
    settings, keys = settings_of(app), redis_keys(app)
    by_partition = {(r.pool, r.index): r for r in rows}
    store = DeadLetterStore(client, keys)
    for view in store.find({r.pool for r in rows}):
        letter = view.dead_letter
        index = letter.partition
        if index is None:
            index = partition_for(letter.key, settings.partitions(letter.pool))
        if (row := by_partition.get((letter.pool, index))) is not None:
            row.parked_keys += 1
    backoff = BackoffStore(store)
    for row in rows:
        summary = backoff.summary(row.queue)
        row.backoff_keys, row.backoff_next_due = summary.count, summary.next_due
    queues = [r.queue for r in rows]
    holders = read_holders(client, keys, queues)
    for row in rows:
        holder = holders.get(row.queue)
        row.consumer = holder.describe() if holder else None
    return read_progress(client, keys, queues)


def _from_broker(broker: BrokerRedis, keys: RedisKeys, rows: list[PartitionStatus],
                 consumed: dict[str, float | None], stall_after: float) -> None:
    now = time.time()
    unacked = unacked_by_queue(broker)
    for row in rows:
        delivered = unacked.get(row.queue, [])
        # The message a partition thread holds (its in-transit list is its unacked record).
        in_transit = int(broker.client.llen(keys.in_transit(row.queue)))
        ages = [now - min(delivered)] if delivered else []
        head = _head_age(broker, row.queue, now)
        if head is not None:
            ages.append(head)
        row.depth, row.unacked = broker.depth(row.queue), len(delivered) + in_transit
        row.oldest_age = round(max(ages), 3) if ages else None
        last = consumed.get(row.queue)
        if row.consumer is not None and last is not None:
            row.last_consumed_age = round(max(0.0, now - last), 3)
            row.stalled = bool(row.depth) and row.last_consumed_age > stall_after


def _with_pauses(rows: list[PartitionStatus], pauses: Sequence[Pause]) -> list[PartitionStatus]:
    by_partition = {(r.pool, r.index): r for r in rows}
    for pause in pauses:
        row = by_partition.get((pause.pool, pause.partition))
        if row is None:
            continue
        if pause.key is not None:
            row.paused_keys += 1
        else:
            row.paused = {k: v for k, v in pause.as_dict().items() if k not in ("key", "pool")}
            row.stalled = False  # not taking messages on purpose
    return rows


def _backoff_cell(row: PartitionStatus, now: float) -> str:
    if not row.backoff_keys or row.backoff_next_due is None:
        return str(row.backoff_keys)
    return f"{row.backoff_keys} (next in {max(0.0, row.backoff_next_due - now):.1f}s)"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}s"
    return str(value)


def render_table(rows: Sequence[PartitionStatus]) -> str:
    """The human table of ``status``."""
    header = ("POOL", "PART", "QUEUE", "DEPTH", "UNACKED", "OLDEST", "CONSUMER", "PARKED",
              "BACKOFF", "PAUSED", "LAST TAKE")
    now = time.time()
    return table([header] + [
        (r.pool, str(r.index), r.queue, _cell(r.depth), _cell(r.unacked), _cell(r.oldest_age),
         r.consumer or "no consumer", str(r.parked_keys), _backoff_cell(r, now), _paused_cell(r),
         _cell(r.last_consumed_age) + (" STALLED" if r.stalled else ""))
        for r in rows])


def _paused_cell(row: PartitionStatus) -> str:
    keys = f"{row.paused_keys} key(s)" if row.paused_keys else ""
    if row.paused is None:
        return keys or "-"
    state = "STOPPED" if row.paused.get("stopped_by") else "PAUSED"
    return f"{state}{', ' + keys if keys else ''}"


def render_pauses(pauses: Sequence[Pause]) -> str:
    """What is paused, since when, by whom (empty when nothing is)."""
    if not pauses:
        return ""
    lines = ["", "paused:"]
    for p in pauses:
        where = (f"key {p.key!r} (pool {p.pool}, partition {p.partition})" if p.key is not None
                 else f"partition {p.pool}.{p.partition}")
        stopped = (f"; holder {p.stopped_by} stopped at {p.stopped_at}" if p.stopped_by else
                   "" if p.key is not None else "; holder not stopped yet")
        lines.append(f"  {where} since {p.at} by {p.by}{stopped}")
    return "\n".join(lines)


def status_json(rows: Sequence[PartitionStatus], checkpoints: Any = None) -> str:
    """The machine form of ``status --json``: ``{"partitions": [...]}``, and ``"checkpoints"``
    (per projection: keys, applied, skipped, last_update) when tasks declare ``checkpoint=``."""
    found: dict[str, Any] = {"partitions": [r.as_dict() for r in rows]}
    if checkpoints is not None:
        found["checkpoints"] = checkpoints
    return json.dumps(found, indent=2)
