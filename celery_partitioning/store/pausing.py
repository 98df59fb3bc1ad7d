"""Pausing a key or a partition, and resuming it: the pause records and what resume releases.

A paused key's messages are set aside by the gate (``gate.lua``) as a parked key's are, with
no dead letter. A paused partition's holder stops between two messages and keeps its lease
(``worker/pausing.py``), and acknowledges the pause. Resuming a key is a replay's release
step without a dead letter; messages also held by a dead letter or a retry backoff stay set
aside for that reason. Key layout in ``keys.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from ..errors import PauseError
from ..message import MessageSummary
from .deadletters import SharedStore
from .keys import key_digest
from .letters import now_iso
from .requeue import HEAD_PUSH, Requeue

__all__ = ["Pause", "PauseStore", "Resumed"]

#: Most records the pause log keeps per pool.
LOG_LIMIT: Final = 1000


@dataclass(frozen=True)
class Pause:
    """A pause of a key (``key`` set) or of a partition (``key`` None), as stored."""

    pool: str
    partition: int
    #: Who paused it: the OS user of the CLI, or the admin user.
    by: str
    #: When (UTC, ISO 8601).
    at: str
    key: str | None = None
    #: A paused partition: the holder that stopped for this pause, and when (None: not yet).
    stopped_by: str | None = None
    stopped_at: str | None = None

    @property
    def what(self) -> str:
        """How messages name it: ``key 'K' of pool P`` or ``partition P.N``."""
        if self.key is not None:
            return f"key {self.key!r} of pool {self.pool}"
        return f"partition {self.pool}.{self.partition}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if not k.startswith("stopped")},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Pause:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Resumed:
    """What a resume did: the pause it ended, the messages it re-queued (in order), and why
    messages stayed set aside (``"a dead letter"``, ``"a retry backoff"``), if they did."""

    pause: Pause
    released: list[MessageSummary] = field(default_factory=list)
    held_by: str | None = None


class PauseStore(SharedStore):
    """Pauses of one app namespace, on a :class:`DeadLetterStore`'s client and keys."""

    # -- pausing ---------------------------------------------------------------------------
    def pause_key(self, pool: str, key: str, partition: int, by: str) -> tuple[Pause, bool]:
        """Pause ``key``: its messages are set aside from the next one the worker takes.
        Returns the pause and True, or the pause in force and False (paused already)."""
        pause = Pause(pool, partition, by, now_iso(), key=key)
        return self._pause(self.keys.paused_keys(pool), key_digest(key), pause)

    def pause_partition(self, pool: str, index: int, by: str) -> tuple[Pause, bool]:
        """Pause partition ``index`` of ``pool`` (its holder stops between two messages).
        Returns the pause and True, or the pause in force and False (paused already)."""
        pause = Pause(pool, index, by, now_iso())
        return self._pause(self.keys.paused_partitions(pool), str(index), pause)

    def _pause(self, name: str, field_name: str, pause: Pause) -> tuple[Pause, bool]:
        with self.client.pipeline() as pipe:  # MULTI: the record with its log entry
            pipe.hsetnx(name, field_name, pause.to_json())
            pipe.hget(name, field_name)
            created, current = pipe.execute()
        if not created:
            return Pause.from_json(current), False
        self._log("pause", pause, pause.by, [])
        return pause, True

    # -- reading ---------------------------------------------------------------------------
    def key_pause(self, pool: str, key: str) -> Pause | None:
        record = self.client.hget(self.keys.paused_keys(pool), key_digest(key))
        return None if record is None else Pause.from_json(record)

    def partition_pause(self, pool: str, index: int) -> Pause | None:
        """The pause of a partition, or None: one ``HGET`` (what its holder polls)."""
        record = self.client.hget(self.keys.paused_partitions(pool), str(index))
        return None if record is None else Pause.from_json(record)

    def partition_pauses(self, pool: str) -> dict[int, Pause]:
        """The paused partitions of ``pool``: one ``HGETALL`` (what a worker process polls)."""
        records = self.client.hgetall(self.keys.paused_partitions(pool))
        return {int(index): Pause.from_json(record) for index, record in records.items()}

    def paused(self, pools: Iterable[str]) -> list[Pause]:
        """Every pause of ``pools``: partitions (with the holder that stopped) then keys."""
        found: list[Pause] = []
        for pool in pools:
            acks = {int(k): json.loads(v) for k, v in
                    self.client.hgetall(self.keys.pause_acks(pool)).items()}
            for raw in self.client.hvals(self.keys.paused_partitions(pool)):
                pause = Pause.from_json(raw)
                ack = acks.get(pause.partition)
                if ack is not None and ack.get("pause_at") == pause.at:
                    pause = replace(pause, stopped_by=ack.get("node"), stopped_at=ack.get("at"))
                found.append(pause)
            found += [Pause.from_json(r) for r in self.client.hvals(self.keys.paused_keys(pool))]
        return sorted(found, key=lambda p: (p.key is not None, p.pool, p.partition, p.at))

    def acknowledge(self, pause: Pause, node: str) -> None:
        """The holder ``node`` of a paused partition has stopped for ``pause``."""
        self.client.hset(self.keys.pause_acks(pause.pool), str(pause.partition),
                         json.dumps({"node": node, "at": now_iso(), "pause_at": pause.at}))

    # -- resuming --------------------------------------------------------------------------
    def resume_partition(self, pool: str, index: int, by: str) -> Resumed:
        """End the pause of a partition: its holder fetches again (within about a second)."""
        name = self.keys.paused_partitions(pool)
        with self.client.pipeline() as pipe:
            pipe.hget(name, str(index))
            pipe.hdel(name, str(index))
            pipe.hdel(self.keys.pause_acks(pool), str(index))
            record, _, _ = pipe.execute()
        if record is None:
            raise self.not_paused(pool, f"partition {pool}.{index}", partition=index)
        pause = Pause.from_json(record)
        self._log("resume", pause, by, [])
        return Resumed(pause)

    def resume_key(self, pool: str, key: str, queue: str, by: str, *,
                   requeue: Requeue = HEAD_PUSH) -> Resumed:
        """End the pause of ``key``: its set-aside messages go back to ``queue`` in order,
        ahead of anything newer (unless a dead letter or a retry backoff still holds them).
        Raises ``PauseError`` when the key is not paused."""
        keys, store = self.keys, self.store
        _, parked, ids, replaying, _ = store.key_names(pool, key)
        paused, digest = keys.paused_keys(pool), key_digest(key)
        dl, backoff = keys.dead_letters(pool), keys.backoff(pool, key)

        def step(pipe: Any) -> Resumed:
            record = pipe.hget(paused, digest)
            if record is None:
                raise self.not_paused(pool, f"key {key!r} of pool {pool}", key=key)
            held_by = ("a dead letter" if pipe.hexists(dl, digest) else
                       "a retry backoff" if pipe.exists(backoff) else None)
            raws: list[str | bytes] = [] if held_by else list(pipe.lrange(parked, 0, -1))
            if raws and not requeue.at_head and pipe.scard(replaying):
                # published to the tail, they would go behind a replay still on its way
                raise PauseError(f"a replay of key {key!r} is still reaching the worker; "
                                 "resume again in a moment")
            pipe.multi()
            pipe.hdel(paused, digest)
            released = store.requeue_in(pipe, pool, key, raws, queue=queue, requeue=requeue)
            return Resumed(Pause.from_json(record), released, held_by)

        done = store.transaction(step, paused, parked, ids, replaying, dl, backoff)
        store.flush_outbox(pool, key, requeue)
        self._log("resume", done.pause, by, done.released)
        return done

    # -- the log ---------------------------------------------------------------------------
    def history(self, pool: str) -> list[dict[str, Any]]:
        """Pauses and resumes of ``pool``, oldest first."""
        return [json.loads(r) for r in self.client.lrange(self.keys.pause_log(pool), 0, -1)]

    def _log(self, action: str, pause: Pause, by: str, messages: list[MessageSummary]) -> None:
        name = self.keys.pause_log(pause.pool)
        event = {"action": action, "at": now_iso(), "by": by, "pause": pause.as_dict(),
                 "messages": [asdict(m) for m in messages]}
        with self.client.pipeline() as pipe:
            pipe.rpush(name, json.dumps(event))
            pipe.ltrim(name, -LOG_LIMIT, -1)
            pipe.execute()

    def not_paused(self, pool: str, what: str, *, key: str | None = None,
                   partition: int | None = None) -> PauseError:
        """The error for resuming something not paused; names its last resume if any."""
        for event in reversed(self.history(pool)):
            pause = event.get("pause") or {}
            same = (pause.get("key") == key if key is not None else
                    pause.get("key") is None and pause.get("partition") == partition)
            if same and event.get("action") == "resume":
                return PauseError(f"{what} is not paused: it was resumed at {event['at']} by "
                                  f"{event['by']}; nothing to resume")
        return PauseError(f"{what} is not paused; nothing to resume "
                          "(see `celery -A proj partitioning status`)")
