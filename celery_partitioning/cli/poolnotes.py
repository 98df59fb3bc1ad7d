"""What ``status`` says under its table about whole pools: unused, stranded, size disagreeing.

* **Unused pools**: ``partitioning worker`` does not run them by default (no registered task
  uses them, or ``partitioning_worker_pools`` leaves them out).
* **Stranded queues**: a queue at or beyond the pool's size that holds messages (shrunk
  without ``partitioning resize``), unless an in-flight resize is draining it.
* **Size disagreement**: the recorded size is not the configured one: workers refuse to start.

Read only, like the rest of ``status``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..state import redis_keys, settings_of, store_client
from ..store.broker import broker_redis
from ..store.membership import describe
from ..store.resize import ResizeState, ResizeStore
from ..tasks import pools_used_by
from .common import declared

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["PoolNotes", "collect_pool_notes", "render_pool_notes"]


@dataclass
class PoolNotes:
    """The notes of ``status`` about whole pools."""

    #: Pools ``partitioning worker`` skips by default.
    unused_pools: list[str] = field(default_factory=list)
    #: ``{"pool", "index", "queue", "depth"}`` of each stranded queue.
    stranded: list[dict[str, Any]] = field(default_factory=list)
    #: ``{"pool", "recorded", "configured"}`` where they differ and no resize is in flight.
    size_mismatches: list[dict[str, Any]] = field(default_factory=list)
    #: pool → its members (worker processes) and partitions still to move (``membership.py``).
    members: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __bool__(self) -> bool:
        return bool(self.unused_pools or self.stranded or self.size_mismatches or self.members)


def unused_pools(app: Celery, pools: Sequence[str]) -> list[str]:
    """The pools among ``pools`` that ``partitioning worker`` does not run by default."""
    settings = settings_of(app)
    if settings.worker_pools is not None:
        return [p for p in pools if p not in settings.worker_pools]
    with contextlib.suppress(Exception):  # a task module that fails to import: no note
        app.loader.import_default_modules()
        used = pools_used_by(app.tasks.values())
        if used:
            return [p for p in pools if p not in used]
    return []


def _from_store(app: Celery, pools: Sequence[str]) -> tuple[dict[str, ResizeState],
                                                             dict[str, Any]]:
    """The recorded sizes of ``pools``, and the members of each pool that has some."""
    settings, keys = settings_of(app), redis_keys(app)
    with store_client(app) as client:
        if client is None:
            return {}, {}
        store = ResizeStore(client, keys, settings.queue_prefix)
        recorded = {pool: state for pool in pools if (state := store.state(pool)) is not None}
        members = {pool: describe(client, keys, pool, [settings.queue_name(pool, i)
                                                       for i in range(settings.partitions(pool))])
                   for pool in pools}
    return recorded, {pool: view for pool, view in members.items() if view}


def _beyond_on_redis(app: Celery, pool: str, size: int, upto: int) -> dict[int, int]:
    """Depth of every queue of ``pool`` with index ≥ ``size`` on a Redis broker: the
    indexes below ``upto`` and any other the broker has a list for (SCAN)."""
    settings = settings_of(app)
    broker = broker_redis(app)
    if broker is None:
        return {}
    try:
        base = settings.queue_name(pool, 0)[:-1]  # "{prefix}.{pool}."
        indexes = set(range(size, upto))
        pattern = re.compile(re.escape(broker.prefix + base) + r"(\d+)(?:\D.*)?$")
        for name in broker.client.scan_iter(match=f"{broker.prefix}{base}*", count=1000):
            found = pattern.match(name.decode() if isinstance(name, bytes) else str(name))
            if found and int(found.group(1)) >= size:
                indexes.add(int(found.group(1)))
        return {i: broker.depth(settings.queue_name(pool, i)) for i in sorted(indexes)}
    finally:
        broker.close()


def _beyond_on_amqp(app: Celery, pool: str, size: int, upto: int) -> dict[int, int]:
    settings = settings_of(app)
    depths: dict[int, int] = {}
    with app.connection_for_read() as conn:
        for index in range(size, upto):
            found = declared(conn, settings.queue_name(pool, index))
            if found is not None:  # else no such queue
                depths[index] = found[0]
    return depths


def collect_pool_notes(app: Celery, pools: Sequence[str] = ()) -> PoolNotes:
    """The notes for ``pools`` (default every configured pool)."""
    settings = settings_of(app)
    chosen = list(pools) or list(settings.pools)
    notes = PoolNotes(unused_pools=unused_pools(app, chosen))
    recorded, notes.members = _from_store(app, chosen)
    on_redis = broker_redis(app) is not None
    for pool in chosen:
        size = settings.partitions(pool)
        state = recorded.get(pool)
        if state is not None and state.size != size and not state.in_flight:
            notes.size_mismatches.append({"pool": pool, "recorded": state.size,
                                          "configured": size})
        # an in-flight resize drains its old partitions itself: not stranded
        draining = state.previous if state is not None and state.in_flight else 0
        upto = max(size, state.size if state is not None else 0, draining or 0)
        beyond = (_beyond_on_redis if on_redis else _beyond_on_amqp)(app, pool, size, upto)
        for index, depth in beyond.items():
            if depth and index >= (draining or 0):
                notes.stranded.append({"pool": pool, "index": index, "depth": depth,
                                       "queue": settings.queue_name(pool, index)})
    return notes


def render_pool_notes(notes: PoolNotes, command: str = "celery -A <app>") -> str:
    """The human lines ``status`` prints under its table."""
    lines: list[str] = []
    if notes.unused_pools:
        lines.append(f"not run by `partitioning worker` by default: pool(s) "
                     f"{', '.join(notes.unused_pools)} (no registered task uses them; start "
                     "them with --pool NAME if their tasks are sent from elsewhere)")
    for m in notes.size_mismatches:
        lines.append(f"pool {m['pool']}: recorded with {m['recorded']} partitions, configured "
                     f"with {m['configured']}: workers refuse to start until you run `{command} "
                     f"partitioning resize {m['pool']} {m['configured']} --from {m['recorded']}`")
    for pool, view in notes.members.items():
        moving = f"; rebalancing: {view['moving']} partition(s) to hand over" if view["moving"] else ""
        lines.append(f"pool {pool}: {len(view['members'])} member(s){moving}")
        for m in view["members"]:
            pinned = f"  pinned to {m['pinned']}" if m["pinned"] else ""
            lines.append(f"  {m['id']}  holds {len(m['holds'])} {m['holds']}{pinned}  "
                         f"last beat {m['last_beat_age']}s ago")
    for s in notes.stranded:
        lines.append(f"STRANDED {s['queue']}: {s['depth']} message(s) beyond pool {s['pool']}'s "
                     f"size (partition {s['index']}); no worker consumes it: record the shrink "
                     f"with `{command} partitioning resize {s['pool']} SIZE --from OLD` to drain "
                     "it in order")
    return "\n".join(lines)
