"""The dead-letter stage: a message that fails for good, or cannot run at all, becomes a dead letter.

* :meth:`DeadLetters.failed`: a partitioned task raised with no retry left. Its message becomes
  a dead letter with the error and traceback and its key is parked; with the failure policy
  ``skip`` the letter is only recorded and the key goes on.
* :meth:`DeadLetters.malformed`: bytes that are not a task message of a known task. Stored raw
  with the reason; its key, if it names one, is parked; otherwise it is filed under
  ``malformed:<id>``, which holds nothing up.

The letter is written before the message is acked. A store that cannot be written stops the
worker without acking (``EXIT_KEEP_MESSAGE``): nothing is lost.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from ..errors import DCBConflict
from ..exits import EXIT_KEEP_MESSAGE, exit_now
from ..message import PartitionMessage, decode_raw, message_summary, raw_message_id
from ..router import HEADER_KEY, HEADER_POOL
from ..store.backoff import as_first_delivery
from ..store.deadletters import DeadLetterStore
from ..store.letters import (
    REASON_DCB_MAX_RETRIES,
    REASON_ERROR,
    REASON_MALFORMED,
    REASON_MAX_RETRIES,
    DeadLetter,
    encode_raw,
    now_iso,
)
from ..store.requeue import Requeue
from ..store.skipping import SkipStore
from ..tasks import spec_of
from .stage import Failure, Place, Stage

__all__ = ["DeadLetters"]

logger = logging.getLogger("celery_partitioning.worker")


class DeadLetters(Stage):
    """Writes the dead letters of one partition."""

    name = "dead letter"

    def __init__(self, place: Place, store: DeadLetterStore, requeue: Requeue) -> None:
        self.place = place
        self.store = store
        self.requeue = requeue
        self.skips = SkipStore(store)

    def policy_of(self, task: Any) -> str:
        """The failure policy of ``task``: its own ``on_failure``, else the setting."""
        spec = spec_of(task)
        chosen = spec.on_failure if spec is not None else None
        return chosen or self.place.settings.on_failure

    def _store(self, letter: DeadLetter, what: str) -> bool:
        try:
            return self.store.dead_letter(letter, self.place.queue, requeue=self.requeue)
        except Exception:  # noqa: BLE001 - exit_now logs the traceback
            exit_now(EXIT_KEEP_MESSAGE, "%s %s and its dead letter could not be stored; "
                     "stopping without acking so the message comes back", self.place.label,
                     what, exc_info=True)

    def failed(self, msg: PartitionMessage, failure: Failure) -> bool:
        """A partitioned task failed for good: dead-letter its message and park its key."""
        task, request, exc, exhausted = (failure.task, failure.request, failure.exc,
                                         failure.exhausted)
        key = msg.partition_key or getattr(request, HEADER_KEY, None)
        if not isinstance(key, str) or not key:
            logger.error("%s[%s] failed but carries no partition key; not dead-lettered",
                         task.name, request.id)
            return True
        if isinstance(exc, DCBConflict) and exhausted:
            reason = REASON_DCB_MAX_RETRIES
        elif exhausted:
            reason = REASON_MAX_RETRIES
        else:
            reason = REASON_ERROR
        place = self.place
        letter = DeadLetter(
            pool=msg.partition_pool or place.pool, key=key,
            task=task.name, id=request.id,
            args=str(getattr(request, "argsrepr", None) or repr(request.args)),
            kwargs=str(getattr(request, "kwargsrepr", None) or repr(request.kwargs)),
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            attempts=(request.retries or 0) + 1, failed_at=now_iso(), reason=reason,
            partition=place.index, queue=place.queue, hostname=place.hostname or None,
            raw=as_first_delivery(msg.raw()),
            policy=self.policy_of(task),
        )
        if letter.policy == "skip":
            self._skip(letter)
            return True
        parked_now = self._store(letter, f"{task.name}[{request.id}] failed")
        logger.error("%s[%s] dead-lettered (%s, %d attempt(s)): %s; key %r of pool %s %s",
                     task.name, request.id, reason, letter.attempts, letter.error, key,
                     letter.pool, "is parked" if parked_now else "was parked already")
        return True

    def _skip(self, letter: DeadLetter) -> None:
        """Record the dead letter of a skip-policy task; its key is not parked."""
        try:
            self.skips.record(letter)
        except Exception:  # noqa: BLE001 - exit_now logs the traceback
            exit_now(EXIT_KEEP_MESSAGE, "%s %s[%s] failed and its dead letter could not be "
                     "stored; stopping without acking so the message comes back",
                     self.place.label, letter.task, letter.id, exc_info=True)
        logger.error("%s[%s] dead-lettered (%s, %d attempt(s)): %s; on_failure=skip: key %r of "
                     "pool %s goes on", letter.task, letter.id, letter.reason, letter.attempts,
                     letter.error, letter.key, letter.pool)

    def malformed(self, raw: bytes | str, problem: str) -> DeadLetter:
        """Dead-letter a message that cannot run at all; the caller then acks / drops it."""
        place = self.place
        payload = decode_raw(raw) or {}
        headers = payload.get("headers")
        named_key = headers.get(HEADER_KEY) if isinstance(headers, dict) else None
        named_pool = headers.get(HEADER_POOL) if isinstance(headers, dict) else None
        key = named_key if isinstance(named_key, str) and named_key else f"malformed:{raw_message_id(raw)}"
        pool = named_pool if isinstance(named_pool, str) and named_pool in place.settings.pools \
            else place.pool
        summary = message_summary(raw)
        text, encoding = encode_raw(raw)
        letter = DeadLetter(
            pool=pool, key=key, task=summary.task, id=summary.id if summary.id != "?" else
            raw_message_id(raw), args=summary.args, kwargs=summary.kwargs,
            error=f"malformed message: {problem}", traceback="", attempts=0,
            failed_at=now_iso(), reason=REASON_MALFORMED, partition=place.index,
            queue=place.queue, hostname=place.hostname or None, raw=text,
            raw_encoding=encoding)
        self._store(letter, f"malformed message {letter.id}")
        logger.error("%s malformed message %s dead-lettered under key %r of pool %s: %s "
                     "(see `celery partitioning dead-letters list`)", place.label, letter.id,
                     key, pool, problem)
        return letter
