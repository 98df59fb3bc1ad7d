"""Going past a failed message: ``dead-letters skip`` and the ``on_failure="skip"`` policy.

A skip is a replay without the failed message (kept in the dead-letter log). A skip-policy
task's dead letter is recorded by task id in ``dl-skipped:{pool}`` and its key never parks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..message import MessageSummary
from .deadletters import SharedStore
from .letters import DeadLetter, DeadLetterView
from .requeue import HEAD_PUSH, Requeue

__all__ = ["SkipResult", "SkipStore"]


@dataclass(frozen=True)
class SkipResult:
    """What a skip did: the failed message dropped, the parked ones re-queued (in order)."""

    skipped: MessageSummary
    released: list[MessageSummary]


class SkipStore(SharedStore):
    """Skips and skip-policy dead letters, on a :class:`DeadLetterStore`'s client and keys."""

    def skip(self, pool: str, key: str, queue: str, *,
             requeue: Requeue = HEAD_PUSH) -> SkipResult:
        """Drop the dead letter of ``key`` (logged), unpark it, and re-queue what was parked
        behind it in order, ahead of anything newer: the release step replay takes too
        (:meth:`DeadLetterStore.release`). Raises ``DeadLetterError`` when the key is not
        parked."""
        done = self.store.release(pool, key, queue, requeue, keep_failed=False)
        return SkipResult(done.skipped or self._skipped_before(pool, key), done.released)

    def _skipped_before(self, pool: str, key: str) -> MessageSummary:
        """The message an interrupted skip dropped, as its log entry names it."""
        event = self.store.last_event(pool, key) or {}
        dropped = event.get("dead_letter") or {}
        return MessageSummary(str(dropped.get("id", "?")), str(dropped.get("task", "?")),
                              str(dropped.get("args", "")), str(dropped.get("kwargs", "")))

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
                self.store.log(pipe, "discard", letter, [letter.summary()], raw=[letter.raw])
                removed, _ = pipe.execute()
            if removed:
                dropped.append(letter)
        return dropped

    def discard_key(self, pool: str, key: str) -> list[MessageSummary]:
        """``dead-letters discard --key``: drop the key's dead letter with what is parked behind
        it (unparking it) and its skip-policy dead letters; ``DeadLetterError`` if it has none."""
        messages = self.store.discard(pool, key) if self.store.is_parked(pool, key) else []
        messages += [letter.summary() for letter in self.discard([pool], key)]
        if not messages:
            raise self.store.not_parked_error([pool], key, "discard")
        return messages
