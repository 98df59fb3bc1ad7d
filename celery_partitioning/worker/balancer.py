"""Which partitions this process should hold, recomputed at every beat.

Every process of ``partitioning worker`` is a member of its pools (``store/membership.py``):
balanced by default, pinned with ``--partitions`` (the balanced members leave those alone). At
each beat a member registers, reads the live members and lease holders and computes the pool's
assignment (``balance.py``), the same on every member, so no coordinator is needed. A partition
no longer wanted is handed over by releasing its lease after the running message; the lease
stays the only permission to consume. The processes of one command wait for each other at
start (``JOIN_DELAY_MS``) so their first assignment counts them all.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..errors import PartitionConfigError
from ..state import redis_client, redis_keys
from ..store.keys import RedisKeys
from ..store.membership import Member, Membership, assignment_of, joined, member_id
from .runtime import LEASE_TAKEOVER_ENV, LEASE_TOKEN_ENV, PROCESSES_ENV, SUPERVISOR_PID_ENV

if TYPE_CHECKING:
    from .lifecycle import Partition
    from .runtime import WorkerRuntime

__all__ = ["Balancer", "Fleet", "BEAT"]

#: Seconds between two beats of a member: a join is balanced within two or three of them.
BEAT: Final = 2.0
#: Seconds between two beats while a starting member waits for the rest of its command.
JOIN_POLL: Final = 0.25

logger = logging.getLogger("celery_partitioning.worker")


class Balancer:
    """This process's share of its pools, recomputed by :meth:`refresh` (``Fleet`` beats it)."""

    def __init__(self, client: Any, keys: RedisKeys, sizes: Mapping[str, int],
                 queue_name: Callable[[str, int], str], *, member: str, ttl: float,
                 pinned: Mapping[str, Sequence[int]] | None = None, token: str = "",
                 succeeds: str = "", group: str = "", group_size: int = 0) -> None:
        self.client = client
        self.keys = keys
        self.membership = Membership(client, keys)
        self.sizes = dict(sizes)
        self.queue_name = queue_name
        self.member = member
        self.ttl = ttl
        self.pinned = {pool: tuple(indexes) for pool, indexes in (pinned or {}).items()}
        self.token = token
        self.succeeds = succeeds
        self.group, self.group_size = group, group_size
        #: Still waiting for the rest of its group (``joined``): beat again soon, not in BEAT.
        self.waiting = False
        self._since: int | None = None
        self._mine: dict[str, frozenset[int]] = {pool: frozenset() for pool in self.sizes}

    def wants(self, pool: str, index: int) -> bool:
        """Whether this process should hold partition ``index`` of ``pool`` now."""
        if pool in self.pinned:
            return index in self.pinned[pool]
        return index in self._mine.get(pool, frozenset())

    def share(self, pool: str) -> list[int]:
        return sorted(self.pinned.get(pool) or self._mine.get(pool, frozenset()))

    def refresh(self) -> None:
        """One beat: register, read the live members and the lease holders, recompute."""
        for pool, size in self.sizes.items():
            now = self.membership.beat([pool], self.member, ttl=self.ttl, since_ms=self._since,
                                       pinned=self.pinned.get(pool, ()), token=self.token,
                                       succeeds=self.succeeds, group=self.group,
                                       group_size=self.group_size)
            self._since = self._since or now
            live = self._without_predecessor(pool, self.membership.live(pool))
            queues = [self.queue_name(pool, index) for index in range(size)]
            result, _current = assignment_of(self.client, self.keys, queues, live, now)
            self.waiting = not self.pinned and self.member not in {m.id for m in joined(live, now)}
            mine = frozenset(result.of(self.member))
            if mine != self._mine.get(pool):
                logger.info("rebalance: this process (%s) now holds %s of pool %s (%d member(s))",
                            self.member, sorted(mine) or "nothing", pool, len(live))
            self._mine[pool] = mine

    def _without_predecessor(self, pool: str, live: list[Member]) -> list[Member]:
        """``live`` without the dead member this process succeeds (removed now, not at its TTL)."""
        gone = [m for m in live if self.succeeds and m.token == self.succeeds]
        if gone:
            self.membership.leave([pool], gone[0].id)
        return [m for m in live if m not in gone]

    def leave(self) -> None:
        """Leave every pool now, so the others need not wait for this member's TTL."""
        try:
            self.membership.leave(self.sizes, self.member)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            logger.warning("could not leave the pools (%s); the others wait for its TTL", exc)


class Fleet:
    """The partition units of a member process. Balanced, a unit starts when the balancer
    gives it here and stops when it goes elsewhere, each in a thread of its own so a long task
    never holds up the beat. Pinned, the caller starts the units and the fleet only beats."""

    def __init__(self, runtime: WorkerRuntime, units: Sequence[Partition], *,
                 balanced: bool = True) -> None:
        settings = runtime.settings
        if settings.redis is None:
            raise PartitionConfigError("a fleet needs the Redis store (partitioning_redis_url): "
                                       "members agree on their shares there")
        pools = sorted({unit.runtime.pool for unit in units})
        self.units = list(units)
        self.balanced = balanced
        pinned = None if balanced else {
            pool: [u.runtime.index for u in units if u.runtime.pool == pool] for pool in pools}
        supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
        self.balancer = Balancer(
            redis_client(settings.redis, timeout=10.0), redis_keys(runtime.app),
            {pool: settings.partitions(pool) for pool in pools}, settings.queue_name,
            member=member_id(), ttl=max(settings.lease_ttl, 3 * BEAT), pinned=pinned,
            token=os.environ.get(LEASE_TOKEN_ENV, ""),
            succeeds=os.environ.get(LEASE_TAKEOVER_ENV, ""),
            group=member_id(pid=int(supervisor)) if supervisor else "",
            group_size=int(os.environ.get(PROCESSES_ENV, "0")) if supervisor else 0)
        self._failing = False
        self._moving: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partition-balancer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more starts or stops by the balancer; leave the pools (the caller stops the units)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(30)
        self.balancer.leave()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.balancer.refresh()
                if self.balanced:
                    self._reconcile()
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - the store may be failing over
                # warned once per outage
                (logger.debug if self._failing else logger.warning)(
                    "membership beat failed (%s); keeping the last share", exc)
                self._failing = True
            self._stop.wait(JOIN_POLL if self.balancer.waiting else BEAT)

    def _reconcile(self) -> None:
        for unit in self.units:
            wanted = self.balancer.wants(unit.runtime.pool, unit.runtime.index)
            if wanted != unit.running:
                self._move(unit, wanted)

    def _move(self, unit: Partition, start: bool) -> None:
        with self._lock:
            if id(unit) in self._moving or self._stop.is_set():
                return
            self._moving.add(id(unit))

        def move() -> None:
            try:
                if start and not self._stop.is_set():
                    unit.start()
                elif not start:
                    logger.info("%s: handed over to another member (after its running task)",
                                unit.label)
                    unit.stop()
            finally:
                with self._lock:
                    self._moving.discard(id(unit))

        threading.Thread(target=move, name=f"partition-move-{unit.label}", daemon=True).start()
