"""Dead letters and per-key parking: every Redis read and write for them (key layout in
``keys.py``).

A key with a dead letter is **parked**: the gate (``gate.lua``) sets its later messages aside
in order. Replay and skip are one release step: the key is unparked and its messages go back
ahead of anything newer (``requeue.py``), each ``replaying`` until it has run, so newer
messages already in flight are deferred behind them. Every replay, skip and discard is logged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, get_args

from ..errors import DeadLetterError
from ..message import MessageSummary, message_summary
from .keys import RedisKeys, key_digest
from .letters import DeadLetter, DeadLetterView, as_text, now_iso
from .requeue import HEAD_PUSH, Requeue
from .scripts import scripts_for

if TYPE_CHECKING:
    from redis import Redis

T = TypeVar("T")


# letters.py defines DeadLetter and now_iso; tests import them from here too.
__all__ = ["DeadLetter", "DeadLetterStore", "GateResult", "GateVerdict", "Released", "SharedStore",
           "now_iso"]

#: What the parking gate decided for one message.
GateVerdict = Literal["run", "parked", "paused", "deferred", "duplicate"]


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict, and what the worker needs to know of a message that runs."""

    verdict: GateVerdict
    #: The task id's in-place retry record (JSON) when the verdict is ``run``, else None.
    attempts: str | None = None
    #: The message belongs to a replay in flight: call ``finished`` when it is done.
    replaying: bool = False

    @classmethod
    def parse(cls, reply: Any) -> GateResult:
        verdict, attempts, replaying = (as_text(reply[0]), as_text(reply[1]) or None, bool(reply[2]))
        if verdict not in get_args(GateVerdict):
            raise DeadLetterError(f"unexpected gate verdict {verdict!r}")
        return cls(verdict, attempts, replaying)  # type: ignore[arg-type]

#: How an error names what was done to a key last (the dead-letter log's actions).
_PAST: Final = {"replay": "replayed", "skip": "skipped", "discard": "discarded"}


@dataclass(frozen=True)
class Released:
    """What a release did: the failed message dropped (a skip; None for a replay or a
    finished interrupted release) and the messages re-queued, in order."""

    skipped: MessageSummary | None
    released: list[MessageSummary]


class DeadLetterStore:
    """Dead letters and parked keys of one app namespace, on one Redis client."""

    def __init__(self, client: Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts_for(client)

    # -- worker side ------------------------------------------------------------------
    def key_names(self, pool: str, key: str) -> list[str]:
        """The key's dead-letter hash, parked list, parked ids, replaying and deferred sets."""
        k = self.keys
        return [k.dead_letters(pool), k.parked(pool, key), k.parked_ids(pool, key),
                k.replaying(pool, key), k.deferred(pool, key)]

    def script_keys(self, pool: str, key: str, queue: str, requeue: Requeue) -> list[str]:
        """KEYS[1..9] of the scripts that start with ``prelude.lua``."""
        return [*self.key_names(pool, key), requeue.head(self.keys, queue),
                self.keys.replay_outbox(pool, key), self.keys.backoff(pool, key),
                self.keys.paused_keys(pool)]

    def gate(self, pool: str, key: str, task_id: str, raw: str, queue: str, *,
             requeue: Requeue = HEAD_PUSH) -> GateVerdict:
        """Decide, atomically, whether a received message runs or is set aside.

        ``parked``/``paused``/``deferred``/``duplicate`` mean it is stored (or was already): ack it.
        """
        return self.check(pool, key, task_id, raw, queue, requeue=requeue).verdict

    def check(self, pool: str, key: str, task_id: str, raw: str, queue: str, *,
              requeue: Requeue = HEAD_PUSH) -> GateResult:
        """:meth:`gate`, with the attempt record and replay membership of a message that runs."""
        reply = self.scripts.check(keys=[*self.script_keys(pool, key, queue, requeue),
                                         self.keys.attempts(task_id)],
                                   args=[key_digest(key), task_id, raw])
        result = GateResult.parse(reply)
        self.flush_outbox(pool, key, requeue)
        return result

    def dead_letter(self, letter: DeadLetter, queue: str, *,
                    requeue: Requeue = HEAD_PUSH) -> bool:
        """Store a dead letter and park its key; False if the key was parked already."""
        stored = self.scripts.dead_letter(
            keys=self.script_keys(letter.pool, letter.key, queue, requeue),
            args=[key_digest(letter.key), letter.id, letter.to_json(), letter.raw_bytes() or b""],
        )
        return bool(stored)

    def finished(self, pool: str, key: str, task_id: str, queue: str, *,
                 requeue: Requeue = HEAD_PUSH) -> None:
        """A message that ran is done: if it was the last one of a replay, release the deferred."""
        self.scripts.finished(keys=self.script_keys(pool, key, queue, requeue),
                              args=[key_digest(key), task_id])
        self.flush_outbox(pool, key, requeue)

    def flush_outbox(self, pool: str, key: str, requeue: Requeue) -> int:
        """Send the key's re-queued messages (:meth:`Requeue.send`; none on a head push)."""
        if requeue.at_head:
            return 0  # no round trip: nothing is ever left there
        return requeue.send(self.client, self.keys.replay_outbox(pool, key))

    def is_parked(self, pool: str, key: str) -> bool:
        return bool(self.client.hexists(self.keys.dead_letters(pool), key_digest(key)))

    # -- operator side ----------------------------------------------------------------
    def get(self, pool: str, key: str) -> DeadLetterView | None:
        """The dead letter of ``key`` in ``pool`` with its parked messages, or None."""
        record = self.client.hget(self.keys.dead_letters(pool), key_digest(key))
        return None if record is None else self._view(record)

    def find(self, pools: Iterable[str], key: str | None = None) -> list[DeadLetterView]:
        """Every dead letter of ``pools`` (only ``key``'s if given), oldest failure first."""
        views: list[DeadLetterView] = []
        for pool in pools:
            name = self.keys.dead_letters(pool)
            records = self.client.hvals(name) if key is None else [
                self.client.hget(name, key_digest(key))]
            views += [self._view(record) for record in records if record is not None]
        return sorted(views, key=lambda v: (v.dead_letter.failed_at, v.dead_letter.pool))

    def _view(self, record: str | bytes) -> DeadLetterView:
        letter = DeadLetter.from_json(record)
        parked = self.client.lrange(self.keys.parked(letter.pool, letter.key), 0, -1)
        return DeadLetterView(letter, tuple(message_summary(m) for m in parked))

    def history(self, pool: str) -> list[dict[str, Any]]:
        """Replays, skips and discards of ``pool``, oldest first."""
        return [json.loads(r) for r in self.client.lrange(self.keys.dead_letter_log(pool), 0, -1)]

    def last_event(self, pool: str, key: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.history(pool)) if e.get("key") == key), None)

    def not_parked_error(self, pools: Iterable[str], key: str, action: str) -> DeadLetterError:
        """The error for ``action`` on a key parked in none of ``pools`` (says what happened)."""
        pools = list(pools)
        events = [e for e in (self.last_event(p, key) for p in pools) if e is not None]
        if events:
            latest = max(events, key=lambda e: str(e.get("at")))
            return self.missing(str(latest["pool"]), key, action)
        if len(pools) == 1:
            return self.missing(pools[0], key, action)
        return DeadLetterError(
            f"no dead letter for key {key!r} in any pool ({', '.join(pools)}); nothing to {action} "
            "(see `celery -A proj partitioning dead-letters list`)")

    def missing(self, pool: str, key: str, action: str) -> DeadLetterError:
        event = self.last_event(pool, key)
        if event is not None:
            return DeadLetterError(
                f"key {key!r} of pool {pool!r} is not parked: it was "
                f"{_PAST.get(event['action'], event['action'])} at "
                f"{event['at']} ({len(event.get('messages', []))} message(s)); nothing to {action}"
            )
        return DeadLetterError(
            f"no dead letter for key {key!r} in pool {pool!r}; nothing to {action} "
            "(see `celery -A proj partitioning dead-letters list`)"
        )

    def replay(self, pool: str, key: str, queue: str, *,
               requeue: Requeue = HEAD_PUSH) -> list[MessageSummary]:
        """Re-queue the dead letter and the parked messages of ``key``, in order, and unpark it
        (:meth:`release`); never twice."""
        return self.release(pool, key, queue, requeue, keep_failed=True).released

    def release(self, pool: str, key: str, queue: str, requeue: Requeue, *,
                keep_failed: bool) -> Released:
        """Unpark ``key`` and re-queue its messages ahead of anything newer, in one transaction
        (what replay and skip both are). ``keep_failed``: the failed message goes first
        (replay), else it is dropped and kept in the log (skip). A release whose outbox was not
        all sent is finished by running it again. ``DeadLetterError`` when not parked."""
        action = "replay" if keep_failed else "skip"
        dl_hash, parked_list, ids, replaying, _ = self.key_names(pool, key)
        outbox = self.keys.replay_outbox(pool, key)
        digest = key_digest(key)

        def step(pipe: Any) -> Released:
            record = pipe.hget(dl_hash, digest)
            if record is None:
                pending = [message_summary(m) for m in pipe.lrange(outbox, 0, -1)]
                if not requeue.at_head and pending:  # an interrupted release: finish it
                    return Released(None, pending)
                raise self.missing(pool, key, action)
            letter = DeadLetter.from_json(record)
            if keep_failed and letter.raw is None:
                raise DeadLetterError(
                    f"the dead letter of key {key!r} (task {letter.id}) has no stored "
                    "message to replay; discard it and re-send the task")
            failed = _failed_message(letter)
            raws: list[str | bytes] = list(pipe.lrange(parked_list, 0, -1))
            if keep_failed:
                raws.insert(0, letter.raw_bytes() or b"")
            pipe.multi()
            released = self.requeue_in(pipe, pool, key, raws, queue=queue, requeue=requeue)
            pipe.srem(ids, letter.id)
            self._unpark(pipe, pool, key, letter)
            extra: dict[str, Any] = {"queue": queue}
            if not keep_failed:
                extra.update(raw=[letter.raw], skipped=failed.__dict__)
            self.log(pipe, action, letter, released, **extra)
            return Released(None if keep_failed else failed, released)

        done = self.transaction(step, dl_hash, parked_list, ids, replaying)
        self.flush_outbox(pool, key, requeue)
        return done

    def requeue_in(self, pipe: Any, pool: str, key: str, raws: Sequence[str | bytes], *,
                   queue: str, requeue: Requeue) -> list[MessageSummary]:
        """In the transaction ``pipe``: send ``raws`` (oldest first) back ahead of anything
        newer of ``key``, each ``replaying`` until it has run, out of the parked list."""
        released = [message_summary(r) for r in raws]
        if not raws:
            return released
        _, parked_list, ids, replaying, _ = self.key_names(pool, key)
        if requeue.at_head:
            # BRPOP consumes from the right: push the newest first, the oldest last.
            pipe.rpush(requeue.head(self.keys, queue), *reversed(raws))
        else:
            pipe.rpush(self.keys.replay_outbox(pool, key), *raws)
        pipe.srem(ids, *[m.id for m in released])
        pipe.sadd(replaying, *[m.id for m in released])
        pipe.delete(parked_list)
        return released

    def _unpark(self, pipe: Any, pool: str, key: str, letter: DeadLetter) -> None:
        pipe.delete(self.keys.parked(pool, key))
        pipe.hdel(self.keys.dead_letters(pool), key_digest(key))
        pipe.delete(self.keys.attempts(letter.id))

    def discard(self, pool: str, key: str) -> list[MessageSummary]:
        """Drop the dead letter and parked messages of ``key``, unpark it, log what was dropped."""
        dl_hash, parked_list, ids, _, _ = self.key_names(pool, key)
        digest = key_digest(key)

        def step(pipe: Any) -> list[MessageSummary]:
            record = pipe.hget(dl_hash, digest)
            if record is None:
                raise self.missing(pool, key, "discard")
            letter = DeadLetter.from_json(record)
            raws = pipe.lrange(parked_list, 0, -1)
            messages = [_failed_message(letter), *(message_summary(r) for r in raws)]
            pipe.multi()
            pipe.srem(ids, *[m.id for m in messages])
            self._unpark(pipe, pool, key, letter)
            self.log(pipe, "discard", letter, messages,
                     raw=[letter.raw, *[as_text(r) for r in raws]])
            return messages

        return self.transaction(step, dl_hash, parked_list, ids)

    def transaction(self, step: Callable[[Any], T], *watched: str) -> T:
        """``step(pipe)``'s value, run by redis-py's ``transaction``: again while a watched key
        changes."""
        client: Any = self.client  # its stubs want a step that returns None
        value: T = client.transaction(step, *watched, value_from_callable=True, watch_delay=0.01)
        return value

    def discard_all(self, pools: Iterable[str]) -> list[tuple[DeadLetter, list[MessageSummary]]]:
        """:meth:`discard` every dead letter of ``pools``, oldest failure first; returns each
        dead letter with the messages dropped (a key replayed or discarded meanwhile is left)."""
        dropped: list[tuple[DeadLetter, list[MessageSummary]]] = []
        for view in self.find(pools):
            letter = view.dead_letter
            try:
                dropped.append((letter, self.discard(letter.pool, letter.key)))
            except DeadLetterError:
                continue
        return dropped

    def log(self, pipe: Any, action: str, letter: DeadLetter,
            messages: Sequence[MessageSummary], **extra: Any) -> None:
        """Append what ``action`` did to ``letter``'s key to its pool's log, on ``pipe``."""
        pipe.rpush(self.keys.dead_letter_log(letter.pool), json.dumps({
            "action": action,
            "at": now_iso(),
            "pool": letter.pool,
            "key": letter.key,
            "dead_letter": {k: v for k, v in asdict(letter).items() if k != "raw"},
            "messages": [asdict(m) for m in messages],
            **extra,
        }))


class SharedStore:
    """A store on a :class:`DeadLetterStore`'s client and keys (pauses, skips, backoffs)."""

    def __init__(self, store: DeadLetterStore) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys


def _failed_message(letter: DeadLetter) -> MessageSummary:
    """The failed message as its raw message shows it, else as its record does."""
    if letter.raw:
        return message_summary(letter.raw_bytes() or b"")
    return letter.summary()
