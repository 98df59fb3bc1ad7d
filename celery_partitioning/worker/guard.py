"""The misroute guard: a message for another partition is moved there, not run.

A message's ``partition_key`` and ``partition_pool`` headers say where it belongs under the
worker's settings. When that is another partition (a resize, or a producer with other settings)
it is re-published, unchanged but for its ``partition_index`` / ``partition_count`` headers, to
its queue, then acked here. A producer's ``partition_count`` other than the worker's is logged
once per pool and count, naming the setting to fix.
"""

from __future__ import annotations

import logging
import threading

from ..errors import PartitioningError
from ..hashing import partition_for
from ..message import PartitionMessage, republish
from ..router import HEADER_COUNT, HEADER_INDEX
from .stage import Place, Stage, Verdict

__all__ = ["MisrouteGuard"]

logger = logging.getLogger("celery_partitioning.worker")

#: (the pool's first queue, producer count) already logged in this process.
_seen_counts: set[tuple[str, int]] = set()
_seen_lock = threading.Lock()


def note_producer_count(place: Place, pool: str, produced: object, count: int) -> None:
    """Log, once per pool and count, a message routed with a pool size other than ``count``."""
    if not isinstance(produced, int) or isinstance(produced, bool) or produced == count:
        return
    seen = (place.settings.queue_name(pool, 0), produced)
    with _seen_lock:
        if seen in _seen_counts:
            return
        _seen_counts.add(seen)
    label = place.label
    logger.warning("%s a producer routes pool %r with %d partition(s), this worker with %d "
                   "(setting partitioning_pools): its messages are re-checked here and moved "
                   "where they belong, but fix the producer's setting (or finish a `partitioning "
                   "resize`); logged once per count", label, pool, produced, count)


class MisrouteGuard(Stage):
    """The stage that re-publishes messages whose key maps to another partition."""

    name = "misroute guard"

    def __init__(self, place: Place) -> None:
        self.place = place

    def before(self, msg: PartitionMessage) -> Verdict:
        place = self.place
        key, pool = msg.partition_key, msg.partition_pool
        if key is None or pool is None:
            return Verdict.RUN  # not a partitioned message: nothing to check
        try:
            count = place.settings.partitions(pool)
            index = partition_for(key, count)
        except PartitioningError as exc:
            logger.error("%s message %s (task %s) names pool %r, which cannot be routed (%s); "
                         "running it here", place.label, msg.task_id, msg.task_name, pool, exc)
            return Verdict.RUN
        note_producer_count(place, pool, msg.headers.get(HEADER_COUNT), count)
        if (pool, index) == (place.pool, place.index):
            return Verdict.RUN
        headers = dict(msg.headers)
        headers[HEADER_INDEX] = index
        headers[HEADER_COUNT] = count
        republish(place.app, pool, index, msg.raw(), headers)
        msg.ack()
        logger.warning("%s misrouted message %s (task %s, key %r) moved to %s: the key maps "
                       "to partition %d of %d of pool %r", place.label, msg.task_id,
                       msg.task_name, key, place.settings.queue_name(pool, index), index,
                       count, pool)
        return Verdict.TAKEN
