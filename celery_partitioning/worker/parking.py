"""The parking stage: a message whose key is parked (behind a dead letter, while it waits
out a retry backoff, or paused by an operator: ``store/pausing.py``) is set aside in order
instead of running; between messages the keys of the partition whose retry backoff is over
are released (re-queued in order).

One ``EVALSHA`` per message (the ``check`` script), which also returns the task's in-place
retry record, so the retry code needs no read of its own. Idempotent by task id: a message
stored but not acked (a crash in between) is recognized when it comes back, and only acked.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Final

from ..message import PartitionMessage
from ..store.attempts import AttemptRecord
from ..store.backoff import BACKOFF_HEADER, BackoffStore
from ..store.deadletters import DeadLetterStore
from ..store.requeue import Requeue
from .inflight import InFlight, InFlightEntry
from .stage import Place, Stage

__all__ = ["Parking", "resume_headers"]

logger = logging.getLogger("celery_partitioning.parking")

#: Longest time the partition thread trusts what it knows of its keys in backoff without
#: reading the schedule again (it sets every key aside itself, and reads the schedule when it
#: starts: this is only a safety net, paid by every idle partition).
RECHECK: Final = 15.0


def resume_headers(message: PartitionMessage, attempts: str | None) -> None:
    """A message whose task id retried before it was delivered again (the worker that waited
    out an in-place retry was killed, or a copy set aside before this version): give it the
    retry count and due time of its attempt record, as the message Celery's retry publishes
    would carry them. ``task_prerun`` and ``self.request.retries`` then see the count, and
    the partition waits for the due time (the ETA hold) before the task starts."""
    record = AttemptRecord.parse(attempts)
    headers = message.message.headers
    if record is None or not isinstance(headers, dict):
        return
    try:
        carried = int(headers.get("retries") or 0)
    except (TypeError, ValueError):
        carried = 0
    if record.retries <= carried:
        return
    headers["retries"] = record.retries
    if record.resume_at > time.time() and not headers.get("eta"):
        headers["eta"] = datetime.fromtimestamp(record.resume_at, UTC).isoformat()


class Parking(Stage):
    """Sets aside (and acks) messages of parked keys and remembers the others in ``inflight``;
    sets a key aside for a retry backoff (:meth:`set_aside`) and releases it when due.

    Only the partition's own thread sets its keys aside, so it knows when the next one is due
    and reads Redis only then (and at start, for what a predecessor left): between messages
    :meth:`between` usually costs no Redis call.
    """

    name = "parking gate"

    def __init__(self, place: Place, store: DeadLetterStore, inflight: InFlight,
                 requeue: Requeue) -> None:
        self.place = place
        self.store = store
        self.backoff = BackoffStore(store)
        self.inflight = inflight
        #: How set-aside messages go back to the queue.
        self.requeue = requeue
        #: When the backoff schedule must be read next (epoch s); 0: at once.
        self.next_check = 0.0

    # -- before a message runs -----------------------------------------------------------
    @staticmethod
    def _stale(message: PartitionMessage, attempts: str | None, replaying: bool) -> bool:
        """A delivery of a task id whose copy was set aside with its key, other than that copy."""
        if not replaying or not attempts:
            return False
        record = AttemptRecord.parse(attempts)
        return (record is not None and record.token is not None
                and message.headers.get(BACKOFF_HEADER) != record.token)

    def before(self, msg: PartitionMessage) -> bool:
        key, pool, task_id = msg.partition_key, msg.partition_pool, msg.task_id
        if key is None or pool is None or task_id is None:
            return False
        raw = msg.payload()
        result = self.store.check(pool, key, task_id, raw, self.place.queue,
                                  requeue=self.requeue)
        verdict = result.verdict
        if verdict == "run" and not self._stale(msg, result.attempts, result.replaying):
            resume_headers(msg, result.attempts)
            self.inflight.put(task_id, InFlightEntry(pool, key, raw, attempts=result.attempts,
                                                     attempts_read=True,
                                                     replaying=result.replaying,
                                                     in_transit=msg.in_transit))
            return False
        if verdict == "run":
            logger.warning("%s[%s]: an older delivery of a message whose copy waits out a retry "
                           "backoff with key %r (a crash before its ack): dropped",
                           msg.task_name, task_id, key)
            msg.ack()
            return True
        what = {"parked": "is parked: message set aside",
                "paused": "is paused: message set aside until `partitioning resume`",
                "deferred": "is being replayed: newer message deferred behind the replay",
                "duplicate": "is parked: message already stored"}[verdict]
        logger.warning("%s[%s]: key %r of pool %s %s", msg.task_name, task_id, key, pool, what)
        msg.ack()
        return True

    # -- a retry with a backoff (called by the retry, in the partition's thread) ---------
    def set_aside(self, entry: InFlightEntry, task_id: str, record: AttemptRecord) -> None:
        """Set the key of ``entry`` aside until ``record.resume_at``, a copy of its message
        first, and save the attempt ``record``; a delivery fetched from this Redis is acked
        in the same step."""
        self.backoff.set_aside(entry.pool, entry.key, task_id, entry.raw, record,
                               queue=self.place.queue, requeue=self.requeue,
                               in_transit=entry.in_transit)
        self.next_check = min(self.next_check, record.resume_at)

    def finished(self, entry: InFlightEntry, task_id: str) -> None:
        """A message that ran is done: the last one of a replay releases what was deferred."""
        if entry.replaying:
            self.store.finished(entry.pool, entry.key, task_id, self.place.queue,
                                requeue=self.requeue)

    # -- between two messages ------------------------------------------------------------
    def recheck(self) -> None:
        """Read the schedule at the next ``between``: the partition is (again) this process's,
        and another may have set keys aside meanwhile."""
        self.next_check = 0.0

    def between(self, idle: bool) -> float:
        """Let the keys whose backoff is over run again; returns the seconds until the next
        is due."""
        now = time.time()
        if now < self.next_check:
            return self.next_check - now
        wait = self.backoff.release_due(self.place.queue, requeue=self.requeue, now=now)
        self.next_check = now + min(wait, RECHECK)
        return self.next_check - now
