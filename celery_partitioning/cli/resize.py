"""``celery -A proj partitioning resize POOL SIZE``: record a resize; what ``status`` shows of it.

Recording is all the command does (one Lua script, ``store/resize.py``): the workers do the
rest. Workers started with the new size hold the keys that moved until their old partition
is drained, then release them in order; workers still running the old size stop by
themselves within seconds, and refuse to start again with it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import CeleryCommand

from ..router import HEADER_COUNT
from ..state import redis_keys, settings_of, store_client
from ..store.broker import broker_redis
from ..store.resize import RELEASING, UNPLACED, ResizeStore
from .common import fail

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["ResizeStatus", "collect_resizes", "render_resizes", "resize_command"]


@dataclass
class ResizeStatus:
    """A resize in flight, as ``status`` shows it."""

    pool: str
    previous: int
    size: int
    started: str | None
    #: Old partition → messages still queued there stamped with the old size (None: unknown).
    old_messages: dict[int, int | None] = field(default_factory=dict)
    drained: list[int] = field(default_factory=list)
    #: New partition → {old partition it waits for: keys held}.
    waiting: dict[int, dict[int, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _store(app: Celery) -> Iterator[ResizeStore | None]:
    with store_client(app) as client:
        yield None if client is None else ResizeStore(client, redis_keys(app),
                                                      settings_of(app).queue_prefix)


def collect_resizes(app: Celery, pools: Sequence[str] = ()) -> list[ResizeStatus]:
    """Every resize in flight among ``pools`` (default all). Read only."""
    settings = settings_of(app)
    found: list[ResizeStatus] = []
    with _store(app) as store:
        if store is None:
            return []
        broker = broker_redis(app)
        try:
            for pool in pools or list(settings.pools):
                state = store.state(pool)
                if state is None or state.previous is None:
                    continue
                row = ResizeStatus(pool, state.previous, state.size, state.started,
                                   drained=sorted(state.drained),
                                   waiting=store.waiting(pool, state.size))
                for old in range(state.previous):
                    row.old_messages[old] = None if broker is None else _stamped(
                        broker, settings.queue_name(pool, old), state.previous)
                found.append(row)
        finally:
            if broker is not None:
                broker.close()
    return found


def _stamped(broker: Any, queue: str, count: int) -> int:
    """Messages of ``queue`` (waiting, or held by its worker) stamped with ``count``."""
    n = 0
    for name in [*broker.queue_lists(queue)]:
        for raw in broker.client.lrange(name, 0, -1):
            try:
                headers = json.loads(raw).get("headers") or {}
            except (ValueError, AttributeError):
                continue
            n += headers.get(HEADER_COUNT) == count
    return n


def render_resizes(rows: Sequence[ResizeStatus]) -> str:
    """The human lines ``status`` prints under its table for each resize in flight."""
    lines: list[str] = []
    for r in rows:
        lines.append(f"pool {r.pool}: resizing from {r.previous} to {r.size} partitions "
                     f"(since {r.started})")
        for old, n in r.old_messages.items():
            state = "drained" if old in r.drained else "draining"
            count = "?" if n is None else str(n)
            lines.append(f"  old partition {old}: {state}, {count} message(s) stamped with "
                         f"{r.previous} still queued")
        for new, olds in sorted(r.waiting.items()):
            waits = ", ".join(_waiting(old, keys) for old, keys in sorted(olds.items()))
            lines.append(f"  partition {new} holds {waits}")
    return "\n".join(lines)


def _waiting(old: int, keys: int) -> str:
    if old == UNPLACED:
        return (f"{keys} key(s) with a message of an unknown partition count (held until an "
                "operator deals with them)")
    if old == RELEASING:
        return f"{keys} key(s) being released (published, not all back yet)"
    return f"{keys} key(s) for old partition {old}"


@click.command(name="resize", cls=CeleryCommand)
@click.argument("pool")
@click.argument("size", type=int)
@click.option("--from", "previous", type=int, default=None, metavar="N",
              help="The pool's current partition count (the size its workers ran with). "
                   "Default: the recorded size (the first worker of a pool records it), else "
                   "the configured one.")
@click.pass_context
def resize_command(ctx: click.Context, pool: str, size: int, previous: int | None) -> None:
    """Record that POOL now has SIZE partitions (grow or shrink), then deploy the workers.

    Workers started with the new size keep every key's order: a key that moved waits for
    the old-size messages of its old partition, which run first; keys that did not move
    are never held. Workers still running the old size stop by themselves once between
    two messages (stop them first to be safe). Follow it with `partitioning status`.
    """
    app = ctx.obj.app
    settings = settings_of(app)
    if pool not in settings.pools:
        fail(f"unknown pool {pool!r}; configured: {', '.join(settings.pools)}")
    if size < 1:
        fail("SIZE must be at least 1")
    with _store(app) as store:
        if store is None:
            fail("resizing needs a Redis store (partitioning_redis_url or a Redis broker)")
        recorded = store.state(pool)
        if recorded is not None and previous is not None and recorded.size != previous \
                and not recorded.in_flight:
            fail(f"pool {pool!r} is recorded with {recorded.size} partitions, not {previous} "
                 f"(--from): `partitioning resize {pool} {size} --from {recorded.size}`")
        if recorded is None:
            start = previous if previous is not None else settings.partitions(pool)
            if start == size:
                fail(f"no size is recorded for pool {pool!r} yet: give its current partition "
                     "count with --from")
            store.begin(pool, start, record=True)
        outcome, state = store.begin(pool, size, record=True)
    if outcome == "conflict":
        fail(f"pool {pool!r} is being resized from {state.previous} to {state.size} "
             "partitions: wait until `partitioning status` shows it finished")
    if outcome == "same":
        click.echo(f"pool {pool}: already {size} partitions"
                   + (f" (resize from {state.previous} in flight)" if state.in_flight else ""))
        return
    click.echo(f"pool {pool}: resize from {state.previous} to {state.size} partitions recorded. "
               f"Workers running {state.previous} stop within seconds; start the workers with "
               f"partitioning_pools {pool!r}: {state.size}.")
