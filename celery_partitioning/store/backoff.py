"""Keys waiting out a retry backoff: set aside with a due time, and released automatically.

A retry delayed by at least ``partitioning_retry_hold_below`` does not hold its partition:
the retried message becomes the first set-aside message of its key (``backoff.lua``) and the
key goes into the partition's schedule with its due time. Later messages of the key are set
aside as for a parked key while other keys go on. When due, the partition thread releases the
key as a replay does (``release.lua``). All of it lives in Redis, so the next holder of the
partition resumes the same keys at the same due times.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Final

from .attempts import ATTEMPTS_TTL, AttemptRecord
from .deadletters import SharedStore
from .keys import key_digest
from .letters import as_text
from .requeue import HEAD_PUSH, Requeue

__all__ = ["BACKOFF_HEADER", "BackoffStore", "BackoffSummary", "as_first_delivery", "with_token"]

#: Most keys one release pass lets go (the rest go on the next pass, right after).
RELEASE_BATCH: Final = 100
#: Header of the copy of a retried message set aside with its key: the token its attempt
#: record names. Another delivery of the task id (the original, redelivered by a broker after
#: a crash between setting the copy aside and the ack) is older: the gate drops it.
BACKOFF_HEADER: Final = "partition_backoff"


def with_token(raw: str, token: str, retries: int | None = None) -> str:
    """The kombu payload ``raw`` with ``token`` in its :data:`BACKOFF_HEADER` header and, if
    given, ``retries`` in its ``retries`` header: the copy set aside is the message Celery's
    retry would have published, so ``task_prerun`` and the task see the count it carries."""
    payload = json.loads(raw)
    headers = {**(payload.get("headers") or {}), BACKOFF_HEADER: token}
    if retries is not None:
        headers["retries"] = retries
    payload["headers"] = headers
    return json.dumps(payload)


def as_first_delivery(raw: str) -> str:
    """A copy set aside for a retry backoff (:func:`with_token`) as it was first published:
    retry count 0, no token. What a dead letter keeps, so a replay starts its retries afresh
    (the attempt record goes with the replay too); any other payload is returned unchanged."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return raw
    headers = payload.get("headers") if isinstance(payload, dict) else None
    if not isinstance(headers, dict) or BACKOFF_HEADER not in headers:
        return raw
    headers = {k: v for k, v in headers.items() if k != BACKOFF_HEADER}
    headers["retries"] = 0
    payload["headers"] = headers
    return json.dumps(payload)


@dataclass(frozen=True)
class BackoffSummary:
    """The keys of one partition waiting out a retry backoff."""

    count: int
    #: When the first of them is due (epoch s), None when there is none.
    next_due: float | None

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until the first key is due (0 if overdue, ``inf`` if none)."""
        return math.inf if self.next_due is None else max(0.0, self.next_due - now)


class BackoffStore(SharedStore):
    """Keys in retry backoff of one app namespace, on the dead-letter store's Redis client."""

    def set_aside(self, pool: str, key: str, task_id: str, raw: str, record: AttemptRecord, *,
                  queue: str, requeue: Requeue = HEAD_PUSH,
                  in_transit: tuple[str, bytes] | None = None) -> None:
        """Set ``key`` aside until ``record.resume_at`` with a copy of the retried message
        ``raw`` first (marked with ``record.token``), and save its attempt ``record``, in one
        script. With ``in_transit`` (where the delivery that ran waits, when it came from this
        Redis) that delivery is acked in the same script; otherwise the caller acks it.
        Idempotent by task id."""
        if record.token is None:
            raise ValueError("a message set aside needs a token in its attempt record")
        store = self.store
        due = record.resume_at
        acked = in_transit if requeue.at_head else None
        store.scripts.backoff(
            keys=[*store.script_keys(pool, key, queue, requeue), self.keys.backoff_schedule(queue),
                  acked[0] if acked else "", self.keys.attempts(task_id)],
            args=[key_digest(key), task_id, with_token(raw, record.token, record.retries), repr(due),
                  json.dumps([pool, key]), acked[1] if acked else b"", record.to_json(),
                  ATTEMPTS_TTL])
        store.flush_outbox(pool, key, requeue)  # what an interrupted release left there

    def release_due(self, queue: str, *, requeue: Requeue = HEAD_PUSH,
                    now: float | None = None) -> float:
        """Re-queue the messages of every key of ``queue``'s partition that is due; returns
        the seconds until the next key is due (``inf`` when none waits)."""
        store = self.store
        schedule = self.keys.backoff_schedule(queue)
        now = time.time() if now is None else now
        due: list[Any] = self.client.zrangebyscore(schedule, "-inf", now, 0, RELEASE_BATCH)
        for raw_member in due:
            member = as_text(raw_member)
            pool, key = json.loads(member)
            released = store.scripts.release(
                keys=[*store.script_keys(pool, key, queue, requeue), schedule],
                args=[key_digest(key), member, repr(now)])
            if released == -3 and not requeue.at_head:
                store.flush_outbox(pool, key, requeue)
                self.client.zrem(schedule, member)
        return self.summary(queue).wait(now)

    def summary(self, queue: str) -> BackoffSummary:
        """How many keys of ``queue``'s partition wait, and when the first is due."""
        schedule = self.keys.backoff_schedule(queue)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(schedule)
            pipe.zrange(schedule, 0, 0, withscores=True)
            count, first = pipe.execute()
        return BackoffSummary(int(count), float(first[0][1]) if first else None)

