"""Dead-letter store and per-key parking: every Redis read and write for them lives here.

Layout (names from :class:`~celery_partitioning.store.keys.RedisKeys`, key text hashed):

* ``dl:{pool}`` hash, key digest → JSON :class:`DeadLetter`. A field present means the key
  is **parked**: the partition's gate sets its later messages aside instead of running them.
* ``parked:{pool}:{digest}`` list of raw kombu payloads set aside, in arrival (publish) order;
  ``parked-ids`` the task ids already stored (dead letter, parked or deferred), so a crash
  between "stored" and "acked" never stores a message twice.
* ``replaying`` / ``deferred``: a replay re-queues messages at the head of the partition queue;
  until each has reached the worker, newer messages of the key that were already in flight are
  deferred and re-queued right behind them (so a replay can never be overtaken).
* ``dl-log:{pool}`` list of JSON records of every replay, skip and discard (what, when).
* ``dl-skipped:{pool}`` hash, task id → JSON :class:`DeadLetter` of a task whose failure
  policy is ``skip``: recorded only, its key is not parked (``store/skipping.py``).
* ``backoff:{pool}:{digest}``: the key waits out a retry backoff; its messages are set aside
  in ``parked`` exactly as a parked key's, and released automatically (``store/backoff.py``).

Replay pushes onto kombu's Redis list in the same transaction as it unparks, so it needs the
broker to be the Redis that holds the store (the default: ``partitioning_redis_url`` falls
back to the broker URL).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from ..errors import DeadLetterError
from ..message import MessageSummary, Publish, message_summary
from .keys import RedisKeys, key_digest
from .scripts import scripts_for

if TYPE_CHECKING:
    from redis import Redis


__all__ = [
    "as_text",
    "send_outbox",
    "DeadLetter",
    "DeadLetterStore",
    "DeadLetterView",
    "GateResult",
    "GateVerdict",
    "REASON_ERROR",
    "REASON_MAX_RETRIES",
    "REASON_DCB_MAX_RETRIES",
    "REASON_MALFORMED",
    "now_iso",
]

#: Reason of a dead letter: the task raised and had no retry policy left to apply.
REASON_ERROR: Final = "ERROR"
#: Reason of a dead letter: ``self.retry()`` / ``autoretry_for`` ran out of retries.
REASON_MAX_RETRIES: Final = "MAX_RETRIES_EXCEEDED"
#: Reason of a dead letter: a ``with_dcb_retry`` task still conflicted on its last attempt.
REASON_DCB_MAX_RETRIES: Final = "DCB_MAX_RETRIES_EXCEEDED"
#: Reason of a dead letter: the message could not be run at all (not a kombu message, an
#: undecodable body, an unknown task); its ``error`` says which.
REASON_MALFORMED: Final = "MALFORMED"

#: What the parking gate decided for one message.
GateVerdict = Literal["run", "parked", "deferred", "duplicate"]


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
        if verdict not in ("run", "parked", "deferred", "duplicate"):
            raise DeadLetterError(f"unexpected gate verdict {verdict!r}")
        return cls(verdict, attempts, replaying)  # type: ignore[arg-type]

#: How an error names what was done to a key last (the dead-letter log's actions).
_PAST: Final = {"replay": "replayed", "skip": "skipped", "discard": "discarded"}


def now_iso() -> str:
    """The current UTC time as stored in records."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class DeadLetter:
    """One failed message of a partitioned task, as stored (JSON) and listed."""

    pool: str
    key: str
    task: str
    id: str
    args: str
    kwargs: str
    error: str
    traceback: str
    attempts: int
    failed_at: str
    reason: str = REASON_ERROR
    partition: int | None = None
    queue: str | None = None
    hostname: str | None = None
    #: The original kombu payload (JSON text), re-queued unchanged by replay.
    raw: str | None = None
    #: ``"base64"`` when ``raw`` holds bytes that are not UTF-8 text (a malformed message).
    raw_encoding: str | None = None
    #: The task's failure policy that applied: ``"park"`` (the key waits behind it) or
    #: ``"skip"`` (recorded only; the key went on).
    policy: str = "park"

    def raw_bytes(self) -> bytes | None:
        """The original message exactly as it was received (None when unknown)."""
        if self.raw is None:
            return None
        if self.raw_encoding == "base64":
            return base64.b64decode(self.raw)
        return self.raw.encode("utf-8")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class DeadLetterView:
    """A dead letter with the messages parked behind it (what ``list`` shows)."""

    dead_letter: DeadLetter
    parked: tuple[MessageSummary, ...] = field(default=())

    def as_dict(self, with_raw: bool = False) -> dict[str, Any]:
        data = asdict(self.dead_letter)
        if not with_raw:
            data.pop("raw", None)
        data["parked_count"] = len(self.parked)
        data["parked"] = [asdict(p) for p in self.parked]
        return data


def send_outbox(client: Any, outbox: str, publish: Publish) -> int:
    """Publish the messages of the Redis list ``outbox``, oldest first; each leaves the list
    once sent. At least once: a crash between publishing and popping re-sends that message."""
    sent = 0
    while (raw := client.lindex(outbox, 0)) is not None:
        publish(as_text(raw))
        client.lpop(outbox)
        sent += 1
    return sent


class DeadLetterStore:
    """Dead letters and parked keys of one app namespace, on one Redis client."""

    def __init__(self, client: Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts_for(client)

    # -- worker side ------------------------------------------------------------------
    def _key_names(self, pool: str, key: str) -> list[str]:
        k = self.keys
        return [k.dead_letters(pool), k.parked(pool, key), k.parked_ids(pool, key),
                k.replaying(pool, key), k.deferred(pool, key)]

    def script_keys(self, pool: str, key: str, queue: str, publish: Publish | None) -> list[str]:
        """KEYS[1..8] of the scripts that start with ``prelude.lua``."""
        return [*self._key_names(pool, key),
                self.keys.broker_queue(queue) if publish is None else "",
                self.keys.replay_outbox(pool, key), self.keys.backoff(pool, key)]

    def gate(self, pool: str, key: str, task_id: str, raw: str, queue: str, *,
             publish: Publish | None = None) -> GateVerdict:
        """Decide, atomically, whether a received message runs or is set aside.

        ``parked``/``deferred``/``duplicate`` mean it is stored (or was already): ack it.
        """
        return self.check(pool, key, task_id, raw, queue, publish=publish).verdict

    def check(self, pool: str, key: str, task_id: str, raw: str, queue: str, *,
              publish: Publish | None = None) -> GateResult:
        """:meth:`gate`, with the attempt record and replay membership of a message that runs."""
        reply = self.scripts.check(keys=[*self.script_keys(pool, key, queue, publish),
                                 self.keys.attempts(task_id)],
                           args=[key_digest(key), task_id, raw])
        result = GateResult.parse(reply)
        if publish is not None:
            self.flush_outbox(pool, key, publish)
        return result

    def dead_letter(self, letter: DeadLetter, queue: str, *,
                    publish: Publish | None = None) -> bool:
        """Store a dead letter and park its key; False if the key was parked already."""
        stored = self.scripts.dead_letter(
            keys=self.script_keys(letter.pool, letter.key, queue, publish),
            args=[key_digest(letter.key), letter.id, letter.to_json(), letter.raw_bytes() or b""],
        )
        return bool(stored)

    def finished(self, pool: str, key: str, task_id: str, queue: str, *,
                 publish: Publish | None = None) -> None:
        """A message that ran is done: if it was the last one of a replay, release the deferred."""
        self.scripts.finished(keys=self.script_keys(pool, key, queue, publish),
                       args=[key_digest(key), task_id])
        if publish is not None:
            self.flush_outbox(pool, key, publish)

    def flush_outbox(self, pool: str, key: str, publish: Publish) -> int:
        """Publish the key's re-queued messages (:func:`send_outbox`)."""
        return send_outbox(self.client, self.keys.replay_outbox(pool, key), publish)

    def is_parked(self, pool: str, key: str) -> bool:
        return bool(self.client.hexists(self.keys.dead_letters(pool), key_digest(key)))

    # -- operator side ----------------------------------------------------------------
    def get(self, pool: str, key: str) -> DeadLetterView | None:
        """The dead letter of ``key`` in ``pool`` with its parked messages, or None."""
        record = self.client.hget(self.keys.dead_letters(pool), key_digest(key))
        if record is None:
            return None
        parked = self.client.lrange(self.keys.parked(pool, key), 0, -1)
        return DeadLetterView(DeadLetter.from_json(record),
                              tuple(message_summary(m) for m in parked))

    def find(self, pools: Iterable[str], key: str | None = None) -> list[DeadLetterView]:
        """Every dead letter of ``pools`` (only ``key``'s if given), oldest failure first."""
        views: list[DeadLetterView] = []
        for pool in pools:
            if key is not None:
                view = self.get(pool, key)
                if view is not None:
                    views.append(view)
                continue
            for record in self.client.hvals(self.keys.dead_letters(pool)):
                letter = DeadLetter.from_json(record)
                parked = self.client.lrange(self.keys.parked(pool, letter.key), 0, -1)
                views.append(DeadLetterView(letter, tuple(message_summary(m) for m in parked)))
        return sorted(views, key=lambda v: (v.dead_letter.failed_at, v.dead_letter.pool))

    def history(self, pool: str) -> list[dict[str, Any]]:
        """Replays, skips and discards of ``pool``, oldest first."""
        events: list[dict[str, Any]] = [
            json.loads(r) for r in self.client.lrange(self.keys.dead_letter_log(pool), 0, -1)]
        return events

    def _last_event(self, pool: str, key: str) -> dict[str, Any] | None:
        for event in reversed(self.history(pool)):
            if event.get("key") == key:
                found: dict[str, Any] = event
                return found
        return None

    def not_parked_error(self, pools: Iterable[str], key: str, action: str) -> DeadLetterError:
        """The error for ``action`` on a key parked in none of ``pools`` (says what happened)."""
        pools = list(pools)
        events = [e for e in (self._last_event(p, key) for p in pools) if e is not None]
        if events:
            latest = max(events, key=lambda e: str(e.get("at")))
            return self._missing(str(latest["pool"]), key, action)
        if len(pools) == 1:
            return self._missing(pools[0], key, action)
        return DeadLetterError(
            f"no dead letter for key {key!r} in any pool ({', '.join(pools)}); nothing to {action} "
            "(see `celery -A proj partitioning dead-letters list`)")

    def _missing(self, pool: str, key: str, action: str) -> DeadLetterError:
        event = self._last_event(pool, key)
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
               publish: Publish | None = None) -> list[MessageSummary]:
        """Re-queue the dead letter and the parked messages of ``key``, in order, and unpark it.

        In one transaction: the messages go to the consuming end of kombu's Redis list of
        ``queue`` in their original order (ahead of anything newer) — or, with ``publish``
        (any other broker), to the key's outbox, published right after — the key is
        unparked, and the replay is logged. Newer messages of the key that reach the worker
        before the replayed ones are deferred behind them. Raises ``DeadLetterError`` when
        the key is not parked (never replays twice).
        """
        from redis.exceptions import WatchError

        names = self._key_names(pool, key)
        dl_hash, parked_list, ids, replaying, _ = names
        outbox = self.keys.replay_outbox(pool, key)
        digest = key_digest(key)
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(dl_hash, parked_list, ids, replaying)
                    record = pipe.hget(dl_hash, digest)
                    if record is None:
                        pending = [message_summary(m) for m in pipe.lrange(outbox, 0, -1)]
                        if publish is not None and pending:  # an interrupted replay: finish it
                            pipe.reset()
                            self.flush_outbox(pool, key, publish)
                            return pending
                        raise self._missing(pool, key, "replay")
                    letter = DeadLetter.from_json(record)
                    if letter.raw is None:
                        raise DeadLetterError(
                            f"the dead letter of key {key!r} (task {letter.id}) has no stored "
                            "message to replay; discard it and re-send the task")
                    raws: list[str | bytes] = [letter.raw_bytes() or b"",
                                               *pipe.lrange(parked_list, 0, -1)]
                    messages = [message_summary(r) for r in raws]
                    pipe.multi()
                    if publish is None:
                        # BRPOP consumes from the right: push the newest first, the dead letter last.
                        pipe.rpush(self.keys.broker_queue(queue), *reversed(raws))
                    else:
                        pipe.rpush(outbox, *raws)
                    pipe.srem(ids, *[m.id for m in messages])
                    pipe.sadd(replaying, *[m.id for m in messages])
                    pipe.delete(parked_list)
                    pipe.hdel(dl_hash, digest)
                    pipe.delete(self.keys.attempts(letter.id))
                    pipe.rpush(self.keys.dead_letter_log(pool), json.dumps(
                        self._event("replay", pool, key, letter, messages, queue=queue)))
                    pipe.execute()
                except WatchError:
                    time.sleep(0.01)
                    continue
            if publish is not None:
                self.flush_outbox(pool, key, publish)
            return messages

    def discard(self, pool: str, key: str) -> list[MessageSummary]:
        """Drop the dead letter and parked messages of ``key``, unpark it, log what was dropped."""
        from redis.exceptions import WatchError

        dl_hash, parked_list, ids, _, _ = self._key_names(pool, key)
        digest = key_digest(key)
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(dl_hash, parked_list, ids)
                    record = pipe.hget(dl_hash, digest)
                    if record is None:
                        raise self._missing(pool, key, "discard")
                    letter = DeadLetter.from_json(record)
                    raws = pipe.lrange(parked_list, 0, -1)
                    messages = [message_summary(letter.raw_bytes() or b"")] if letter.raw else [
                        MessageSummary(letter.id, letter.task, letter.args, letter.kwargs)]
                    messages += [message_summary(r) for r in raws]
                    pipe.multi()
                    pipe.srem(ids, *[m.id for m in messages])
                    pipe.delete(parked_list)
                    pipe.hdel(dl_hash, digest)
                    pipe.delete(self.keys.attempts(letter.id))
                    pipe.rpush(self.keys.dead_letter_log(pool), json.dumps(
                        self._event("discard", pool, key, letter, messages,
                                    raw=[letter.raw, *[as_text(r) for r in raws]])))
                    pipe.execute()
                    return messages
                except WatchError:
                    time.sleep(0.01)

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

    @staticmethod
    def _event(action: str, pool: str, key: str, letter: DeadLetter,
               messages: Sequence[MessageSummary], **extra: Any) -> dict[str, Any]:
        return {
            "action": action,
            "at": now_iso(),
            "pool": pool,
            "key": key,
            "dead_letter": {k: v for k, v in asdict(letter).items() if k != "raw"},
            "messages": [asdict(m) for m in messages],
            **extra,
        }


def as_text(value: Any) -> str:
    """A Redis reply as text (bytes decoded as UTF-8)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
