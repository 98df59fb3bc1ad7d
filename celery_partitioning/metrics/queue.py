"""What the queues and the store hold, read at every scrape: the queue-side view.

The numbers come from ``cli/status.py``'s own collection (``collect_status``: one broker
and store read per scrape, no state changed), as gauges labelled ``pool``, ``partition``
and ``queue``; the holder as an info-style gauge (``holder`` label, value 1) next to
``celery_partitioning_partition_has_holder`` (0 or 1, for alerting). A scrape that cannot
reach the broker gives ``celery_partitioning_exporter_up 0`` and no partition samples.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..cli.resize import collect_resizes
from ..cli.status import PartitionStatus, collect_status

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["QueueCollector", "depth_skew"]

logger = logging.getLogger("celery_partitioning.metrics")

_LABELS = ["pool", "partition", "queue"]


def depth_skew(depths: Sequence[float]) -> float:
    """The busiest partition's count over the pool's mean (1 = even; 0 when all are 0)."""
    total = sum(depths)
    if not depths or total == 0:
        return 0.0
    return max(depths) / (total / len(depths))


def _gauge(name: str, doc: str, labels: Sequence[str] = _LABELS) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class QueueCollector(Collector):
    """The queue-side gauges of ``pools`` (default all), only the ``only`` (pool, index)
    pairs when given (a worker exports the partitions it runs)."""

    def __init__(self, app: Celery, pools: Sequence[str] = (),
                 only: Collection[tuple[str, int]] | None = None) -> None:
        self.app = app
        self.pools = tuple(pools)
        self.only = None if only is None else frozenset(only)

    def collect(self) -> Iterator[Any]:
        up = _gauge("celery_partitioning_exporter_up", "1 when the last scrape could read the "
                    "partitions from the broker", [])
        try:
            rows = [row for row in collect_status(self.app, self.pools)
                    if self.only is None or (row.pool, row.index) in self.only]
            resizing = {r.pool for r in collect_resizes(self.app, self.pools)}
        except Exception as exc:  # noqa: BLE001 - a scrape reports, it does not crash the server
            logger.warning("metrics: cannot read the partitions (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from partition_families(rows)
        yield from pool_families(rows, resizing)


def partition_families(rows: Sequence[PartitionStatus]) -> Iterator[GaugeMetricFamily]:
    depth = _gauge("celery_partitioning_queue_depth", "Messages waiting in the partition queue")
    unacked = _gauge("celery_partitioning_unacked", "Messages delivered and not acked (Redis)")
    lag = _gauge("celery_partitioning_lag_seconds", "Age of the oldest message of the partition "
                 "(0 when empty; Redis only)")
    has_holder = _gauge("celery_partitioning_partition_has_holder", "1 when a worker holds the "
                        "partition (its lease, or a consumer on RabbitMQ)")
    holder = _gauge("celery_partitioning_partition_holder", "The partition's holder, as a label "
                    "(value 1)", [*_LABELS, "holder"])
    parked = _gauge("celery_partitioning_parked_keys", "Keys parked behind a dead letter")
    backoff = _gauge("celery_partitioning_backoff_keys", "Keys waiting out a retry backoff")
    stalled = _gauge("celery_partitioning_partition_stalled", "1 when the holder has taken no "
                     "message while the queue had messages, longer than the threshold")
    paused = _gauge("celery_partitioning_partition_paused", "1 while an operator's pause of the "
                    "partition is in force")
    paused_keys = _gauge("celery_partitioning_paused_keys", "Keys paused by an operator")
    for row in rows:
        labels = [row.pool, str(row.index), row.queue]
        if row.depth is not None:
            depth.add_metric(labels, row.depth)
        if row.unacked is not None:
            unacked.add_metric(labels, row.unacked)
        if row.oldest_age is not None:
            lag.add_metric(labels, row.oldest_age)
        elif row.unacked is not None and row.depth == 0:
            lag.add_metric(labels, 0.0)  # Redis, nothing waiting: no lag, not unknown
        has_holder.add_metric(labels, 1 if row.consumer else 0)
        if row.consumer:
            holder.add_metric([*labels, row.consumer], 1)
        parked.add_metric(labels, row.parked_keys)
        backoff.add_metric(labels, row.backoff_keys)
        stalled.add_metric(labels, 1 if row.stalled else 0)
        paused.add_metric(labels, 1 if row.paused is not None else 0)
        paused_keys.add_metric(labels, row.paused_keys)
    yield from (depth, unacked, lag, has_holder, holder, parked, backoff, stalled, paused,
                paused_keys)


def pool_families(rows: Sequence[PartitionStatus], resizing: Collection[str]) -> Iterator[Any]:
    skew = _gauge("celery_partitioning_pool_depth_skew", "Deepest partition queue over the "
                  "pool's mean depth (1 even; 0 all empty)", ["pool"])
    rebalance = _gauge("celery_partitioning_pool_rebalancing", "1 while a resize of the pool is in "
                       "flight (keys moving between partitions)", ["pool"])
    pools: dict[str, list[int]] = {}
    for row in rows:
        pools.setdefault(row.pool, []).append(row.depth or 0)
    for pool, depths in pools.items():
        skew.add_metric([pool], depth_skew(depths))
        rebalance.add_metric([pool], 1 if pool in resizing else 0)
    yield skew
    yield rebalance
