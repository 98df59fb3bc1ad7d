"""Going past a failed message: ``dead-letters skip`` and the ``on_failure="skip"`` policy.

* :meth:`SkipStore.skip` is a replay without the failed message: in one transaction the
  dead letter is dropped (kept in the dead-letter log, raw message included, as ``discard``
  keeps it), the key is unparked, and the messages parked behind it are re-queued exactly as
  :meth:`DeadLetterStore.replay` re-queues them: at the head of the partition's Redis list, or
  through the key's outbox on another broker, each ``replaying`` until it is done, so newer
  messages of the key are deferred behind them and nothing overtakes them.
* :meth:`SkipStore.record` stores the dead letter of a task whose failure policy is ``skip``
  in ``dl-skipped:{pool}`` (by task id: a crash before the ack stores it once); its key is
  never parked. ``list`` shows these with ``policy: skip``; ``discard`` drops them (logged).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..message import MessageSummary, Publish, message_summary
from .deadletters import DeadLetter, DeadLetterStore, DeadLetterView
from .keys import key_digest

__all__ = ["SkipResult", "SkipStore"]


@dataclass(frozen=True)
class SkipResult:
    """What a skip did: the failed message dropped, the parked ones re-queued (in order)."""

    skipped: MessageSummary
    released: list[MessageSummary]


class SkipStore:
    """Skips and skip-policy dead letters, on a :class:`DeadLetterStore`'s client and keys."""

    def __init__(self, store: DeadLetterStore) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys

    def skip(self, pool: str, key: str, queue: str, *,
             publish: Publish | None = None) -> SkipResult:
        """Drop the dead letter of ``key`` (logged), unpark it, and re-queue what was parked
        behind it in order, ahead of anything newer (see :meth:`DeadLetterStore.replay` for
        ``queue`` and ``publish``). Raises ``DeadLetterError`` when the key is not parked."""
        from redis.exceptions import WatchError

        dl_hash, parked_list, ids, replaying, _ = self.store._key_names(pool, key)
        outbox = self.keys.replay_outbox(pool, key)
        digest = key_digest(key)
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(dl_hash, parked_list, ids, replaying)
                    record = pipe.hget(dl_hash, digest)
                    if record is None:
                        pending = [message_summary(m) for m in pipe.lrange(outbox, 0, -1)]
                        if publish is not None and pending:  # an interrupted skip: finish it
                            pipe.reset()
                            self.store.flush_outbox(pool, key, publish)
                            event = self.store._last_event(pool, key) or {}
                            dropped = event.get("dead_letter") or {}
                            return SkipResult(MessageSummary(
                                str(dropped.get("id", "?")), str(dropped.get("task", "?")),
                                str(dropped.get("args", "")), str(dropped.get("kwargs", ""))),
                                pending)
                        raise self.store._missing(pool, key, "skip")
                    letter = DeadLetter.from_json(record)
                    failed = (message_summary(letter.raw_bytes() or b"") if letter.raw else
                              MessageSummary(letter.id, letter.task, letter.args, letter.kwargs))
                    raws: list[str | bytes] = list(pipe.lrange(parked_list, 0, -1))
                    released = [message_summary(r) for r in raws]
                    pipe.multi()
                    if raws and publish is None:
                        # BRPOP consumes from the right: push the newest first.
                        pipe.rpush(self.keys.broker_queue(queue), *reversed(raws))
                    elif raws:
                        pipe.rpush(outbox, *raws)
                    pipe.srem(ids, letter.id, *[m.id for m in released])
                    if released:
                        pipe.sadd(replaying, *[m.id for m in released])
                    pipe.delete(parked_list)
                    pipe.hdel(dl_hash, digest)
                    pipe.delete(self.keys.attempts(letter.id))
                    pipe.rpush(self.keys.dead_letter_log(pool), json.dumps(self.store._event(
                        "skip", pool, key, letter, released, queue=queue, raw=[letter.raw],
                        skipped=failed.__dict__)))
                    pipe.execute()
                except WatchError:
                    time.sleep(0.01)
                    continue
            if publish is not None:
                self.store.flush_outbox(pool, key, publish)
            return SkipResult(failed, released)

    # -- on_failure="skip" ----------------------------------------------------------------
    def record(self, letter: DeadLetter) -> bool:
        """Store the dead letter of a skip-policy task; False if its task id was stored already."""
        return bool(self.client.hsetnx(self.keys.skipped_dead_letters(letter.pool), letter.id,
                                       letter.to_json()))

    def find(self, pools: Iterable[str], key: str | None = None) -> list[DeadLetterView]:
        """The skip-policy dead letters of ``pools`` (only ``key``'s if given)."""
        views = []
        for pool in pools:
            for record in self.client.hvals(self.keys.skipped_dead_letters(pool)):
                letter = DeadLetter.from_json(record)
                if key is None or letter.key == key:
                    views.append(DeadLetterView(letter))
        return views

    def discard(self, pools: Iterable[str], key: str | None = None) -> list[DeadLetter]:
        """Drop the skip-policy dead letters of ``pools`` (only ``key``'s if given), each
        logged as a discard; returns them."""
        dropped = []
        for view in self.find(pools, key):
            letter = view.dead_letter
            name = self.keys.skipped_dead_letters(letter.pool)
            with self.client.pipeline() as pipe:  # MULTI: the record leaves with its log entry
                pipe.hdel(name, letter.id)
                pipe.rpush(self.keys.dead_letter_log(letter.pool), json.dumps(self.store._event(
                    "discard", letter.pool, letter.key, letter,
                    [MessageSummary(letter.id, letter.task, letter.args, letter.kwargs)],
                    raw=[letter.raw])))
                removed, _ = pipe.execute()
            if removed:
                dropped.append(letter)
        return dropped
