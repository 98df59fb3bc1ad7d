"""The misroute guard: the first gate; a message for another partition is moved, not run.

A message's ``partition_key`` and ``partition_pool`` headers say where it belongs under
the *current* settings (``partition_for(key, pool size)``). When that is not this
worker's partition (the pool was resized, or a producer ran with other settings) the
message is re-published, unchanged but for its ``partition_index`` / ``partition_count``
headers, to its right queue, then acked here. It never runs on the wrong partition.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import PartitioningError
from ..hashing import partition_for
from ..message import PartitionMessage, republish
from ..router import HEADER_COUNT, HEADER_INDEX
from .runtime import Gate

if TYPE_CHECKING:
    from .runtime import PartitionRuntime

__all__ = ["misroute_guard"]

logger = logging.getLogger("celery_partitioning.worker")


def misroute_guard(runtime: PartitionRuntime) -> Gate:
    """The gate that re-publishes messages whose key maps to another partition."""

    def guard(msg: PartitionMessage) -> bool:
        key, pool = msg.partition_key, msg.partition_pool
        if key is None or pool is None:
            return False  # not a partitioned message: nothing to check
        try:
            count = runtime.settings.partitions(pool)
            index = partition_for(key, count)
        except PartitioningError as exc:
            logger.error("%s message %s (task %s) names pool %r, which cannot be routed (%s); "
                         "running it here", runtime.label, msg.task_id, msg.task_name, pool, exc)
            return False
        if (pool, index) == (runtime.pool, runtime.index):
            return False
        headers = dict(msg.headers)
        headers[HEADER_INDEX] = index
        headers[HEADER_COUNT] = count
        republish(runtime.app, pool, index, msg.payload(), headers)
        msg.ack()
        logger.warning("%s misrouted message %s (task %s, key %r) moved to %s: the key maps "
                       "to partition %d of %d of pool %r", runtime.label, msg.task_id,
                       msg.task_name, key, runtime.settings.queue_name(pool, index), index,
                       count, pool)
        return True

    guard.__name__ = "misroute guard"
    return guard
