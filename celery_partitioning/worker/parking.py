"""The parking stage: a message whose key is parked (behind a dead letter, in retry backoff, or
paused: ``store/pausing.py``) is set aside in order instead of running. Between messages, keys
whose backoff is over are re-queued in order; after the last message of a replay, what was
deferred behind it is released.

One ``EVALSHA`` per message (``check``), which also reads the task's attempt record for the
retry stage. Idempotent by task id: a message stored but not acked before a crash is only
acked when it comes back.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from ..message import PartitionMessage
from ..store.attempts import AttemptRecord
from ..store.backoff import BACKOFF_HEADER, BackoffStore
from ..store.deadletters import DeadLetterStore
from ..store.requeue import Requeue
from .stage import Outcome, Place, Stage, Verdict

__all__ = ["Parking"]

logger = logging.getLogger("celery_partitioning.parking")

#: Longest time the thread trusts what it knows of its keys in backoff (a safety net: it
#: sets them aside itself and reads the schedule at start).
RECHECK: Final = 15.0


class Parking(Stage):
    """Sets aside (and acks) messages of parked keys; releases keys in backoff when due.
    ``after`` hears each due time, so :meth:`between` reads Redis only when one is due."""

    name = "parking gate"

    def __init__(self, place: Place, store: DeadLetterStore, requeue: Requeue) -> None:
        self.place = place
        self.store = store
        self.backoff = BackoffStore(store)
        self.requeue = requeue
        #: When the backoff schedule must be read next (epoch s); 0: at once.
        self.next_check = 0.0
        #: The task id of the running message when it belongs to a replay.
        self.replaying: str | None = None

    # -- before a message runs -----------------------------------------------------------
    @staticmethod
    def _stale(message: PartitionMessage, attempts: str | None, replaying: bool) -> bool:
        """A delivery of a task id whose copy was set aside with its key, other than that copy."""
        if not replaying or not attempts:
            return False
        record = AttemptRecord.parse(attempts)
        return (record is not None and record.token is not None
                and message.headers.get(BACKOFF_HEADER) != record.token)

    def before(self, msg: PartitionMessage) -> Verdict:
        key, pool, task_id = msg.partition_key, msg.partition_pool, msg.task_id
        self.replaying = None
        if key is None or pool is None or task_id is None:
            return Verdict.RUN
        result = self.store.check(pool, key, task_id, msg.raw(), self.place.queue,
                                  requeue=self.requeue)
        verdict = result.verdict
        if verdict == "run" and not self._stale(msg, result.attempts, result.replaying):
            msg.attempts, msg.attempts_read = result.attempts, True
            self.replaying = task_id if result.replaying else None
            return Verdict.RUN
        if verdict == "run":
            logger.warning("%s[%s]: an older delivery of a message whose copy waits out a retry "
                           "backoff with key %r (a crash before its ack): dropped",
                           msg.task_name, task_id, key)
            msg.ack()
            return Verdict.TAKEN
        what = {"parked": "is parked: message set aside",
                "paused": "is paused: message set aside until `partitioning resume`",
                "deferred": "is being replayed: newer message deferred behind the replay",
                "duplicate": "is parked: message already stored"}[verdict]
        logger.warning("%s[%s]: key %r of pool %s %s", msg.task_name, task_id, key, pool, what)
        msg.ack()
        return Verdict.TAKEN

    def after(self, msg: PartitionMessage, outcome: Outcome) -> None:
        """A key set aside: read the schedule when due. The end of a replay: release what
        was deferred behind it."""
        if not outcome.done:
            self.next_check = min(self.next_check, outcome.resume_at)
        elif self.replaying is not None and self.replaying == msg.task_id:
            key, pool = msg.partition_key, msg.partition_pool
            assert key is not None and pool is not None
            self.store.finished(pool, key, self.replaying, self.place.queue,
                                requeue=self.requeue)
        self.replaying = None

    # -- between two messages ------------------------------------------------------------
    def recheck(self) -> None:
        """Read the schedule at the next ``between`` (the lease was taken anew)."""
        self.next_check = 0.0

    def between(self, idle: bool) -> float:
        """Release the keys whose backoff is over; returns the seconds until the next is due."""
        now = time.time()
        if now < self.next_check:
            return self.next_check - now
        wait = self.backoff.release_due(self.place.queue, requeue=self.requeue, now=now)
        self.next_check = now + min(wait, RECHECK)
        return self.next_check - now
