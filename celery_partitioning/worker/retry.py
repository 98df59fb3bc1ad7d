"""The retry stage: where a partitioned task's retry waits, and its attempt record.

Celery's retry semantics are computed in ``task_patch.py``; a retry is never re-published to the
back of the queue, which would reorder the partition. This stage decides where it waits:

* ``retrying``: a delay of at least ``partitioning_retry_hold_below`` sets the *key* aside
  (``store/backoff.py``): a copy of the message goes first among the key's set-aside messages,
  the parking stage sets later ones aside behind it and re-queues them in order when due.
  A shorter delay waits in place, the message unacked. Either way the count, due time and
  changed arguments go into the attempt record (``store/attempts.py``).
* ``before``: a task id with an attempt record resumes it after a crash: the count in its
  ``retries`` header, the due time as its ETA, the arguments in ``PartitionMessage.call``.
* ``after``: a message that is done forgets its record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import UTC, datetime

from ..message import PartitionMessage
from ..store.attempts import AttemptRecord, AttemptStore
from ..store.backoff import BackoffStore
from ..store.lease import new_token
from ..store.requeue import Requeue
from .eta import eta_of
from .stage import Outcome, Place, Stage, Verdict
from .task_patch import decode_call

__all__ = ["Retry"]

logger = logging.getLogger("celery_partitioning.retry")


class Retry(Stage):
    """Owns the attempt record of the running message and where its retries wait."""

    name = "retry"

    def __init__(self, place: Place, attempts: AttemptStore, backoff: BackoffStore,
                 requeue: Requeue) -> None:
        self.place = place
        self.attempts = attempts
        self.backoff = backoff
        self.requeue = requeue
        #: The task id of the running message when Redis may hold its attempt record.
        self.recorded: str | None = None

    def before(self, msg: PartitionMessage) -> Verdict:
        task_id = msg.task_id
        self.recorded = None
        if task_id is None or (not msg.attempts_read and msg.partition_key is None):
            return Verdict.RUN  # not a partitioned task's message: no retry of ours
        raw = msg.attempts if msg.attempts_read else self.attempts.load_raw(task_id)
        if raw is not None:
            self.recorded = task_id
            record = AttemptRecord.parse(raw)
            if record is not None:
                self._resume(msg, record)
        return Verdict.RUN

    def _resume(self, msg: PartitionMessage, record: AttemptRecord) -> None:
        """Give the message the count, due time and arguments of its record."""
        headers = msg.message.headers
        if not isinstance(headers, dict):
            return
        try:
            carried = int(headers.get("retries") or 0)
        except (TypeError, ValueError):
            carried = 0
        if record.retries < carried:
            return  # an older record: the message is newer than it
        msg.raw()  # as received: a copy set aside or a dead letter keeps its headers
        logger.info("%s resumes at retry %d", msg.task_id, record.retries)
        headers["retries"] = record.retries
        if record.resume_at > max(time.time(), eta_of(headers) or 0.0):
            headers["eta"] = datetime.fromtimestamp(record.resume_at, UTC).isoformat()
        if record.call is not None:
            try:
                msg.call = decode_call(record.call)
            except Exception:  # an unreadable record must not lose the message
                logger.exception("%s: the arguments its last retry gave cannot be read; it "
                                 "resumes with the message's own", msg.task_id)

    def retrying(self, msg: PartitionMessage, record: AttemptRecord, delay: float) -> bool:
        """Set the key aside until ``record.resume_at`` (True), or keep the record for an
        in-place wait (False: a short delay, or a message without a key)."""
        task_id, key, pool = msg.task_id, msg.partition_key, msg.partition_pool
        assert task_id is not None
        self.recorded = task_id
        if delay < self.place.settings.retry_hold_below or not (
                msg.attempts_read and key and pool):
            self.attempts.save(task_id, record)
            return False
        # A copy of the message first, marked with a new token (older deliveries are dropped);
        # a delivery fetched from this Redis is acked in the same script.
        self.backoff.set_aside(pool, key, task_id, msg.raw(), replace(record, token=new_token()),
                               queue=self.place.queue, requeue=self.requeue,
                               in_transit=msg.in_transit)
        return True

    def after(self, msg: PartitionMessage, outcome: Outcome) -> None:
        if outcome.done and self.recorded is not None and self.recorded == msg.task_id:
            self.attempts.forget(self.recorded)
        self.recorded = None
