"""Resizing a pool: the recorded transition from N to M partitions, every Redis read and write.

Records are per ``{queue_prefix}.{pool}`` (a set of queues, whatever the broker); the layout
is in ``keys.py``. New partition ``q`` holds a key that moved until its old partition ``p`` is
drained: ``p``'s old-size messages of the key are moved aside, then released to ``q`` ahead
of the key's newer messages. Every step is one Lua script (``scripts/resize_*.lua``), so a
SIGKILL at any point leaves the step either done or not done.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from .keys import RedisKeys, key_digest
from .letters import as_text, now_iso
from .requeue import HEAD_PUSH, Requeue
from .scripts import scripts_for

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["RELEASING", "UNPLACED", "ResizeState", "ResizeStore", "GateAction"]

#: How a message of a key reaches the resize gate (see ``resize_gate.lua``).
GateAction = Literal["old", "new", "unplaced", "mark"]


#: In :meth:`ResizeStore.waiting`: keys held for a message of an unknown partition count.
UNPLACED: Final = -1
#: In :meth:`ResizeStore.waiting`: keys whose released messages are on their way back.
RELEASING: Final = -2


@dataclass(frozen=True)
class ResizeState:
    """What is recorded for one pool."""

    pool: str
    #: The partition count workers must run with.
    size: int
    #: The previous count while a resize is in flight, else None.
    previous: int | None = None
    started: str | None = None
    finished: str | None = None
    #: Old partitions drained so far (during a resize).
    drained: frozenset[int] = field(default_factory=frozenset)

    @property
    def in_flight(self) -> bool:
        return self.previous is not None


class ResizeStore:
    """The resize records of one app namespace, on one Redis client."""

    def __init__(self, client: Redis, keys: RedisKeys, scope: str) -> None:
        self.client = client
        self.keys = keys
        #: The app's partition queue prefix: records are per set of queues, so two apps (or
        #: test runs) with their own queues never share a pool's record, whatever the broker.
        self.scope = scope
        self._scripts = scripts_for(client)
        #: :meth:`recent_state`'s last read of each pool: (when, state).
        self._recent: dict[str, tuple[float, ResizeState | None]] = {}
        self._recent_lock = threading.Lock()

    def _scoped(self, pool: str) -> str:
        return f"{self.scope}.{pool}"

    def _common(self, pool: str) -> list[str]:
        k, scoped = self.keys, self._scoped(pool)
        return [k.resize(scoped), k.resize_drained(scoped), k.resize_ids(scoped),
                k.resize_released(scoped)]

    # -- recording --------------------------------------------------------------------
    def begin(self, pool: str, size: int, *, record: bool,
              claim: bool = False) -> tuple[str, ResizeState]:
        """Check (a worker starting) or record (the resize command) ``size`` for ``pool``;
        ``claim`` (the first worker of a pool): record it if nothing is recorded yet, else check.
        Returns the outcome (see ``resize_begin.lua``) and the state after it (for ``none``: ``size``,
        not recorded)."""
        name = self._scoped(pool)
        reply = self._scripts.resize_begin(
            keys=[self.keys.resize(name), self.keys.resize_drained(name)],
            args=[size, now_iso(), "record" if record else "claim" if claim else "check"])
        state = self.state(pool)
        return as_text(reply[0]), state if state is not None else ResizeState(pool, size)

    def state(self, pool: str) -> ResizeState | None:
        """What is recorded for ``pool`` (None: no resize was ever recorded for it)."""
        name = self._scoped(pool)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.resize(name))
            pipe.smembers(self.keys.resize_drained(name))
            record, drained = pipe.execute()
        fields = {as_text(k): as_text(v) for k, v in record.items()}
        if "size" not in fields:
            return None
        previous = fields.get("from")
        return ResizeState(
            pool, int(fields["size"]), int(previous) if previous else None,
            fields.get("started"), fields.get("finished"),
            frozenset(int(as_text(i)) for i in drained) if previous else frozenset())

    def recent_state(self, pool: str, max_age: float) -> ResizeState | None:
        """:meth:`state`, read at most once per ``max_age`` seconds for every partition of
        the process that shares this store (their periodic size checks cost one read)."""
        with self._recent_lock:
            now = time.monotonic()
            read_at, state = self._recent.get(pool, (-math.inf, None))
            if now - read_at >= max_age:
                state = self.state(pool)
                self._recent[pool] = (now, state)
            return state

    # -- worker side ------------------------------------------------------------------
    def gate(self, pool: str, key: str, task_id: str, raw: str, action: GateAction, *,
             old: int, new: int, mark: int | None, requeue: Requeue = HEAD_PUSH,
             here: int | None = None) -> str:
        """Decide for one message of a key during the resize (``resize_gate.lua``). Through
        an outbox (``requeue``) what it releases to partition ``new`` goes to ``new``'s outbox,
        sent here only when ``new`` is ``here`` (the partition's own thread alone sends its
        outbox: two senders could send one message twice)."""
        outboxed = not requeue.at_head and new == here
        name = self._scoped(pool)
        digest = key_digest(key)
        lists = self.keys.resize_lists(name) + digest
        reply = self._scripts.resize_gate(
            keys=[*self._common(pool), self.keys.resize_waiting(name, new), lists + ":moved",
                  lists + ":held", lists + ":pending" if outboxed else "",
                  self.keys.resize_outbox(name, new) if outboxed else ""],
            args=[digest, task_id, raw, action, old, "" if mark is None else mark])
        if outboxed:
            self.flush_outbox(pool, new, requeue)
        return as_text(reply)

    def poll(self, pool: str, here: int, queue_list: str | None, old_queue_list: str | None, *,
             requeue: Requeue = HEAD_PUSH) -> tuple[bool, int]:
        """Between two messages of partition ``here``: mark it drained if it is an old partition
        (``old_queue_list`` given) whose queue is empty, and release the keys held here whose old
        partition is drained (to the head of ``queue_list``, or, None, through the outbox). Returns
        (whether the resize is still in flight, messages released)."""
        name = self._scoped(pool)
        in_flight, released = self._scripts.resize_poll(
            keys=[*self._common(pool), self.keys.resize_waiting(name, here), queue_list or "",
                  old_queue_list or "", self.keys.resize_outbox(name, here)],
            args=[self.keys.resize_lists(name), here])
        self.flush_outbox(pool, here, requeue)
        return bool(in_flight), int(released)

    def flush_outbox(self, pool: str, index: int, requeue: Requeue) -> int:
        """Send partition ``index``'s released messages (:meth:`Requeue.send`)."""
        return requeue.send(self.client, self.keys.resize_outbox(self._scoped(pool), index))

    def mark_drained(self, pool: str, index: int) -> None:
        """Old partition ``index`` holds no more old-size messages (its queue was seen empty)."""
        name = self._scoped(pool)
        self.client.sadd(self.keys.resize_drained(name), index)

    def take(self, pool: str, queue_list: str, old: int, raw: bytes | None, *,
             task_id: str = "", key: str = "", new: int = 0) -> int:
        """Move the head ``raw`` of old partition ``old`` (one with no partition of the new
        size) to its key's moved list; ``raw=None`` marks ``old`` drained if its queue is empty.
        Returns 1 moved, 2 drained, 0 the head changed (read it again)."""
        name = self._scoped(pool)
        digest = key_digest(key)
        reply = self._scripts.resize_take(
            keys=[queue_list, self.keys.resize_ids(name), self.keys.resize_waiting(name, new),
                  self.keys.resize_lists(name) + digest + ":moved",
                  self.keys.resize_drained(name)],
            args=[raw or b"", task_id, digest, old])
        return int(reply)

    def finish(self, pool: str, previous: int, size: int) -> bool:
        """End the resize if every old partition is drained and no key waits; True when no
        resize is in flight (any more)."""
        name = self._scoped(pool)
        reply = self._scripts.resize_finish(
            keys=[*self._common(pool),
                  *(self.keys.resize_waiting(name, q) for q in range(size))],
            args=[previous, now_iso()])
        return bool(reply)

    # -- status -----------------------------------------------------------------------
    def waiting(self, pool: str, size: int) -> dict[int, dict[int, int]]:
        """New partition → {old partition it waits for: keys held}; old partition
        :data:`UNPLACED` for messages of an unknown count, :data:`RELEASING` for keys whose
        released messages are published but not all back yet."""
        name = self._scoped(pool)
        found: dict[int, dict[int, int]] = {}
        for q in range(size):
            for old in self.client.hvals(self.keys.resize_waiting(name, q)):
                counts = found.setdefault(q, {})
                text = as_text(old)
                p = RELEASING if text == "r" else int(text)
                counts[p] = counts.get(p, 0) + 1
        return found

