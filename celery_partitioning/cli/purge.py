"""``celery -A proj partitioning purge``: empty the partition queues ``celery purge`` leaves alone.

``celery purge`` knows only the queues listed in the settings; partition queues are declared
by the router. On Redis every priority list of a queue is deleted, on AMQP ``queue.purge``.
Messages a worker holds (delivered, not acked), dead letters and parked keys are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
from celery.bin.base import CeleryCommand
from kombu.utils.url import maybe_sanitize_url

from ..errors import PartitioningError
from ..exits import EXIT_UNCLEAN
from ..state import redis_keys, settings_of, store_client
from ..store.broker import BrokerRedis, broker_redis
from ..store.lease import read_holders
from ..worker.supervisor import select_partitions
from .common import declared, fail

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["QueuePlan", "plan_purge", "purge", "purge_command"]

T = TypeVar("T")


@dataclass(frozen=True)
class QueuePlan:
    """One selected partition queue before purging."""

    pool: str
    index: int
    queue: str
    #: Messages waiting (0 when the queue was never declared).
    depth: int
    #: Who consumes it: the lease holder (Redis) or "N consumer(s)" (AMQP); None when idle.
    consumer: str | None


def _lease_holders(app: Celery, queues: Sequence[str]) -> dict[str, str]:
    """``queue → "node (pid N)"`` for every selected queue whose lease is held (Redis store)."""
    with store_client(app) as client:
        if client is None or not queues:
            return {}
        holders = read_holders(client, redis_keys(app), queues)
    return {queue: holder.describe() for queue, holder in holders.items() if holder is not None}


def _each_queue(app: Celery, queues: Sequence[str], on_redis: Callable[[BrokerRedis, str], T],
                on_amqp: Callable[[Any, str], T]) -> dict[str, T]:
    """``queue → on_redis(broker, queue)`` on a Redis broker, else ``on_amqp(connection, queue)``."""
    broker = broker_redis(app)
    if broker is not None:
        try:
            return {queue: on_redis(broker, queue) for queue in queues}
        finally:
            broker.close()
    with app.connection_for_write() as conn:
        return {queue: on_amqp(conn, queue) for queue in queues}


def plan_purge(app: Celery, pools: Sequence[str] = (), partitions: str | None = None) -> list[QueuePlan]:
    """The selected partition queues with their depth and consumer; changes nothing."""
    specs = select_partitions(settings_of(app), pools, partitions)
    held = _lease_holders(app, [s.queue for s in specs])
    found = _each_queue(app, [s.queue for s in specs], lambda broker, q: (broker.depth(q), 0),
                        lambda conn, q: declared(conn, q) or (0, 0))
    return [QueuePlan(s.pool, s.index, s.queue, found[s.queue][0], held.get(s.queue) or (
        f"{found[s.queue][1]} consumer(s)" if found[s.queue][1] else None)) for s in specs]


def _purge_redis(broker: BrokerRedis, queue: str) -> int:
    # One MULTI per queue: the count is exactly what was deleted.
    with broker.client.pipeline(transaction=True) as pipe:
        for name in broker.queue_lists(queue):
            pipe.llen(name)
            pipe.delete(name)
        replies = pipe.execute()
    return sum(int(n) for n in replies[::2])


def _purge_amqp(conn: Any, queue: str) -> int:
    if declared(conn, queue) in (None, (0, 0)):
        return 0  # nothing there (purging an unknown queue closes the channel)
    channel = conn.channel()
    try:
        return int(channel.queue_purge(queue=queue) or 0)
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def purge(app: Celery, queues: Sequence[str]) -> dict[str, int]:
    """Delete the waiting messages of ``queues``: ``queue → messages deleted``."""
    return _each_queue(app, queues, _purge_redis, _purge_amqp)


@click.command(name="purge", cls=CeleryCommand)
@click.option("--pool", "pools", multiple=True, metavar="NAME",
              help="Only this pool's partitions (repeat for several). Default: every pool.")
@click.option("--partitions", metavar="SPEC",
              help="Only these partitions: POOL:INDEXES, several separated by commas "
                   "(entity:0-5,global:0), or plain indexes (0-3,7) when one pool is selected. "
                   "Default: all.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--while-running", is_flag=True,
              help="Purge partitions that a worker is consuming too (by default they are refused).")
@click.pass_context
def purge_command(ctx: click.Context, *, pools: tuple[str, ...], partitions: str | None,
                  force: bool, while_running: bool) -> None:
    """Delete the messages waiting in partition queues (plain `celery purge` skips them).

    Asks for confirmation unless -f. Refuses, deleting nothing, while any selected partition
    is being consumed (its lease is held on Redis; a consumer is attached on RabbitMQ): stop
    its worker first, or pass --while-running. Messages a worker holds (delivered, not yet
    acked), dead letters and parked keys are kept: see `partitioning dead-letters`.
    """
    app = ctx.obj.app
    broker = maybe_sanitize_url(app.conf.broker_url or "")
    try:
        plans = plan_purge(app, pools, partitions)
    except PartitioningError as exc:
        fail(str(exc))
    except (*app.connection_for_read().connection_errors, OSError) as exc:
        fail(f"cannot read the partitions from {broker}: {exc}; nothing was deleted", EXIT_UNCLEAN)
    live = [p for p in plans if p.consumer is not None]
    if live and not while_running:
        for p in live:
            click.echo(f"{p.queue}: consumed by {p.consumer}", err=True)
        fail(f"{len(live)} selected partition(s) are being consumed; stop their workers, or pass "
             "--while-running to purge under them; nothing was deleted", EXIT_UNCLEAN)
    total = sum(p.depth for p in plans)
    if not force:
        click.confirm(f"Delete the {total} message(s) waiting in {len(plans)} partition queue(s) "
                      f"on {broker}?", abort=True, err=True)
    try:
        deleted = purge(app, [p.queue for p in plans])
    except (*app.connection_for_read().connection_errors, OSError) as exc:
        fail(f"purging on {broker} failed: {exc}", EXIT_UNCLEAN)
    for p in plans:
        running = f" (while consumed by {p.consumer})" if p.consumer else ""
        click.echo(f"{p.queue}: deleted {deleted[p.queue]} message(s){running}")
    click.echo(f"deleted {sum(deleted.values())} message(s) from {len(plans)} partition queue(s)")
