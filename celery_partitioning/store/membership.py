"""Who is running a pool: member processes registered in the store, with a heartbeat.

A member is one worker process that hosts partitions of a pool. It beats every few seconds
(server time, so hosts with skewed clocks agree); a member whose last beat is older than its
TTL is gone, and is removed by whoever reads the list next. The balanced assignment
(``balance.py``) is computed from this list and from the lease holders (on RabbitMQ too: with
the Redis store every partition thread takes the lease before it consumes).
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ..balance import Assignment, assign
from .keys import RedisKeys
from .lease import read_holders

__all__ = ["JOIN_DELAY_MS", "Member", "Membership", "assignment_of", "describe", "joined",
           "member_id"]

#: A balanced member started with siblings (the processes of one ``partitioning worker``) is
#: left out of the assignment until every sibling is live, or this long at most (three beats
#: of ``worker/balancer.py``, in case one never starts): otherwise the first process to beat
#: takes every partition and hands most over moments later. Kafka's
#: ``group.initial.rebalance.delay.ms`` does the same.
JOIN_DELAY_MS: Final = 6000


def member_id(node: str = "", pid: int | None = None) -> str:
    """A member id: ``host:pid`` (plus the Celery node name when known), unique per process."""
    return f"{node or socket.gethostname()}:{os.getpid() if pid is None else pid}"


@dataclass(frozen=True)
class Member:
    """A live member as stored (times in server milliseconds)."""

    id: str
    host: str
    pid: int
    since_ms: int
    beat_ms: int
    ttl_ms: int
    #: Partitions this member is pinned to (``--partitions``); empty: balanced.
    pinned: tuple[int, ...] = field(default_factory=tuple)
    #: Its lease token, and the token of the process it succeeds (its supervisor saw that one
    #: die): the successor inherits its leases, so it also inherits its partitions.
    token: str = ""
    succeeds: str = ""
    #: Its siblings' group (``host:pid`` of their supervisor) and how many processes it has.
    group: str = ""
    group_size: int = 0

    @property
    def balanced(self) -> bool:
        return not self.pinned

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "pinned": list(self.pinned)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Member:
        data = json.loads(text)
        return cls(str(data["id"]), str(data["host"]), int(data["pid"]), int(data["since_ms"]),
                   int(data["beat_ms"]), int(data["ttl_ms"]), tuple(data.get("pinned", ())),
                   str(data.get("token", "")), str(data.get("succeeds", "")),
                   str(data.get("group", "")), int(data.get("group_size", 0)))


class Membership:
    """Register, beat, leave and list the members of pools in one store."""

    def __init__(self, client: Any, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    def now_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def beat(self, pools: Iterable[str], member: str, *, ttl: float, since_ms: int | None = None,
             pinned: Sequence[int] = (), token: str = "", succeeds: str = "", group: str = "",
             group_size: int = 0) -> int:
        """Register or refresh ``member`` in ``pools``; returns the server time of the beat."""
        now = self.now_ms()
        record = Member(member, socket.gethostname(), os.getpid(), since_ms or now, now,
                        int(ttl * 1000), tuple(pinned), token, succeeds, group,
                        group_size).to_json()
        with self.client.pipeline(transaction=False) as pipe:
            for pool in pools:
                pipe.hset(self.keys.members(pool), member, record)
            pipe.execute()
        return now

    def leave(self, pools: Iterable[str], member: str) -> None:
        """Remove ``member`` at once (a warm stop), so the others rebalance without waiting."""
        with self.client.pipeline(transaction=False) as pipe:
            for pool in pools:
                pipe.hdel(self.keys.members(pool), member)
            pipe.execute()

    def live(self, pool: str, *, prune: bool = True) -> list[Member]:
        """The members of ``pool`` whose beat is within their TTL, by id; removes the others
        (not with ``prune=False``: read-only callers such as ``status``)."""
        now = self.now_ms()
        members: list[Member] = []
        gone: list[Member] = []
        for raw in self.client.hvals(self.keys.members(pool)):
            member = Member.from_json(raw)
            (members if member.beat_ms + member.ttl_ms >= now else gone).append(member)
        if gone and prune:
            self.client.hdel(self.keys.members(pool), *[member.id for member in gone])
        return sorted(members, key=lambda member: member.id)


def joined(live: Sequence[Member], now_ms: int) -> list[Member]:
    """``live`` without the balanced members still waiting for their siblings
    (``JOIN_DELAY_MS``). A restarted process does not wait: its siblings are live already."""
    count = Counter(member.group for member in live)
    return [m for m in live if m.pinned or count[m.group] >= m.group_size
            or now_ms - m.since_ms >= JOIN_DELAY_MS]


def assignment_of(client: Any, keys: RedisKeys, queues: Sequence[str], live: Sequence[Member],
                  now_ms: int) -> tuple[Assignment, dict[int, str]]:
    """The pool's balanced assignment among ``live`` members that have joined (``joined``),
    and who holds each partition now (index → member id, from the lease holders; a dead
    process's leases count as its successor's): what every member and ``status`` compute
    alike."""
    holders = read_holders(client, keys, queues, ttl=False)
    heirs = {member.succeeds: member.id for member in live if member.succeeds}
    current = {index: heirs.get(holder.token, f"{holder.host}:{holder.pid}")
               for index, holder in enumerate(holders[q] for q in queues) if holder}
    result = assign(range(len(queues)), [m.id for m in joined(live, now_ms) if m.balanced], current,
                    {m.id: m.pinned for m in live if not m.balanced})
    return result, current


def describe(client: Any, keys: RedisKeys, pool: str, queues: Sequence[str]) -> dict[str, Any]:
    """What ``status`` shows of a pool's members (read only): each live member with the
    partitions it holds and those the balance gives it, and how many partitions are still to
    change hands (a rebalance in progress when not 0)."""
    membership = Membership(client, keys)
    live = membership.live(pool, prune=False)
    if not live:
        return {}
    now = membership.now_ms()
    result, current = assignment_of(client, keys, queues, live, now)
    return {"members": [{"id": m.id, "host": m.host, "pid": m.pid, "since_ms": m.since_ms,
                         "last_beat_age": round((now - m.beat_ms) / 1000, 1),
                         "pinned": list(m.pinned),
                         "holds": sorted(i for i, owner in current.items() if owner == m.id),
                         "assigned": result.of(m.id)} for m in live],
            "moving": len(result.moves)}
