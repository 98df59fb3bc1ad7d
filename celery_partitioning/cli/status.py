"""Partition status, read only: depth, unacked, oldest age, consumer, parked keys per partition.

Redis broker: depth is the length of the queue's lists, unacked counts kombu's ``unacked``
entries routed to the queue, the oldest age is the larger of the oldest unacked message's
time since delivery and the queue head's time since publish (header
``partition_published_at``), the consumer is the lease holder. RabbitMQ: depth and consumer
count come from a passive queue declare; unacked and ages are not known over AMQP (None).
Parked keys, the keys waiting out a retry backoff (how many, when the first is due) and what
an operator paused (``store/pausing.py``) come from the dead-letter store when a Redis store
is configured. Nothing here changes any state.
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
from ..store.backoff import BackoffStore, BackoffSummary
from ..store.broker import BrokerRedis, broker_redis, unacked_by_queue
from ..store.deadletters import DeadLetterStore
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


def _parked_counts(app: Celery, pools: Sequence[str]) -> dict[tuple[str, int], int]:
    settings = settings_of(app)
    counts: dict[tuple[str, int], int] = {}
    with store_client(app) as client:
        if client is None:
            return counts
        for view in DeadLetterStore(client, redis_keys(app)).find(pools):
            letter = view.dead_letter
            index = letter.partition
            if index is None:
                index = partition_for(letter.key, settings.partitions(letter.pool))
            counts[(letter.pool, index)] = counts.get((letter.pool, index), 0) + 1
    return counts


def _backoffs(app: Celery, queues: Sequence[str]) -> dict[str, BackoffSummary]:
    with store_client(app) as client:
        if client is None:
            return {}
        backoff = BackoffStore(DeadLetterStore(client, redis_keys(app)))
        return {queue: backoff.summary(queue) for queue in queues}


def collect_pauses(app: Celery, pools: Sequence[str] = ()) -> list[Pause]:
    """Every pause in force of ``pools`` (default all): partitions first, then keys."""
    with store_client(app) as client:
        if client is None:
            return []
        return PauseStore(DeadLetterStore(client, redis_keys(app))).paused(
            list(pools) or list(settings_of(app).pools))


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


def _leases(app: Celery, queues: Sequence[str]) -> tuple[dict[str, str | None],
                                                          dict[str, float | None]]:
    """Each queue's lease holder, and when it last consumed (epoch s)."""
    with store_client(app) as client:
        if client is None:
            return {}, {}
        holders = read_holders(client, redis_keys(app), queues)
        progress = read_progress(client, redis_keys(app), queues)
    return ({queue: holder.describe() if holder else None for queue, holder in holders.items()},
            progress)


def collect_status(app: Celery, pools: Sequence[str] = (),
                   stall_after: float = STALL_AFTER) -> list[PartitionStatus]:
    """One PartitionStatus per partition of ``pools`` (default all), pool order then index;
    a partition is *stalled* when its holder took no message for ``stall_after`` seconds
    while its queue has some."""
    settings = settings_of(app)
    chosen = list(pools) or list(settings.pools)
    parts = [(p, i, settings.queue_name(p, i)) for p in chosen for i in range(settings.partitions(p))]
    parked = _parked_counts(app, chosen)
    pauses = collect_pauses(app, chosen)
    backoffs = _backoffs(app, [q for _, _, q in parts])
    now = time.time()
    rows: list[PartitionStatus] = []
    broker = broker_redis(app)
    if broker is not None:
        try:
            leases, consumed = _leases(app, [q for _, _, q in parts])
            unacked = unacked_by_queue(broker)
            keys = redis_keys(app)
            for pool, index, queue in parts:
                delivered = unacked.get(queue, [])
                # The message a partition thread holds (its in-transit list is its unacked record).
                in_transit = int(broker.client.llen(keys.in_transit(queue)))
                ages = [now - min(delivered)] if delivered else []
                head = _head_age(broker, queue, now)
                if head is not None:
                    ages.append(head)
                row = PartitionStatus(
                    pool, index, queue, broker.depth(queue), len(delivered) + in_transit,
                    round(max(ages), 3) if ages else None, leases.get(queue),
                    parked.get((pool, index), 0))
                last = consumed.get(queue)
                if row.consumer is not None and last is not None:
                    row.last_consumed_age = round(max(0.0, now - last), 3)
                    row.stalled = bool(row.depth) and row.last_consumed_age > stall_after
                rows.append(row)
        finally:
            broker.close()
        return _with_pauses(_with_backoffs(rows, backoffs), pauses)
    with app.connection_for_read() as conn:
        for pool, index, queue in parts:
            depth, consumers = declared(conn, queue) or (None, None)
            consumer = None if not consumers else f"{consumers} consumer(s)"
            rows.append(PartitionStatus(pool, index, queue, depth, None, None, consumer,
                                        parked.get((pool, index), 0)))
    return _with_pauses(_with_backoffs(rows, backoffs), pauses)


def _with_backoffs(rows: list[PartitionStatus],
                   backoffs: dict[str, BackoffSummary]) -> list[PartitionStatus]:
    for row in rows:
        summary = backoffs.get(row.queue)
        if summary is not None:
            row.backoff_keys, row.backoff_next_due = summary.count, summary.next_due
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
