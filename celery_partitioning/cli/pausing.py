"""``celery -A proj partitioning pause|resume --key K [--pool P] | --partition pool.N``.

What the commands (and the Django admin pages) do lives in the functions here: which pool a
key is in, which partition a ``pool.N`` names, pausing and resuming through
``store/pausing.py``. A paused key's messages are set aside in order; a paused partition's
holder stops between two messages and keeps its lease; resume releases what was set aside,
in order, ahead of newer messages.
"""

from __future__ import annotations

import getpass
import json
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import click
from redis.exceptions import RedisError

from ..errors import PartitioningError, PauseError
from ..hashing import partition_for
from ..state import settings_of
from ..store.broker import BrokerRedis, broker_redis, wake_fetches
from ..store.lease import read_holders
from ..store.pausing import Pause, PauseStore, Resumed
from .common import app_of
from .deadletters import replay_target, store_for_app

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["PauseDone", "pause_command", "pause_target", "paused_store", "resume_command",
           "resume_target"]

#: Seconds ``pause --partition`` waits by default for the holder to stop.
WAIT: Final = 10.0
#: Seconds between two wakes of the holder's fetch while waiting for it to stop.
WAKE_EVERY: Final = 1.0


@dataclass(frozen=True)
class PauseDone:
    """What a pause did: the pause in force, whether it is new, and for a partition its
    lease holder (None: no worker holds it) and whether that holder has stopped."""

    pause: Pause
    new: bool
    holder: str | None = None
    stopped: bool = False


def paused_store(app: Celery) -> PauseStore:
    """The pause store of an app (its dead-letter store's Redis)."""
    return PauseStore(store_for_app(app))


def parse_partition(app: Celery, spec: str) -> tuple[str, int]:
    """``pool.N`` as (pool, N); ``PauseError`` naming what exists when it is no partition."""
    settings = settings_of(app)
    pool, sep, raw = spec.rpartition(".")
    if not sep or not raw.isdigit():
        raise PauseError(f"--partition wants pool.index (for example entity.3), not {spec!r}")
    if pool not in settings.pools:
        raise PauseError(f"unknown partition {spec}: no pool {pool!r} (configured: "
                         f"{', '.join(settings.pools)})")
    count = settings.partitions(pool)
    if int(raw) >= count:
        raise PauseError(f"unknown partition {spec}: pool {pool} has partitions 0-{count - 1}")
    return pool, int(raw)


def key_pool(app: Celery, store: PauseStore, key: str, pool: str | None, *,
             resuming: bool) -> str:
    """The pool of ``key``: ``pool`` if given; for a resume the one pool it is paused in;
    else the only pool configured. ``PauseError`` when that is ambiguous or not paused."""
    settings = settings_of(app)
    if pool:
        settings.partitions(pool)  # PartitionConfigError naming the known pools
        return pool
    pools = list(settings.pools)
    if resuming:
        found = [p for p in pools if store.key_pause(p, key) is not None]
        if len(found) == 1:
            return found[0]
        if not found and len(pools) == 1:
            raise store.not_paused(pools[0], f"key {key!r} of pool {pools[0]}", key=key)
        if not found:
            raise PauseError(f"key {key!r} is paused in no pool ({', '.join(pools)}); "
                             "nothing to resume")
        pools = found
    elif len(pools) == 1:
        return pools[0]
    raise PauseError(f"key {key!r} may be in any of the pools {', '.join(pools)}: pass --pool")


def pause_target(app: Celery, *, by: str, key: str | None = None, pool: str | None = None,
                 partition: str | None = None, wait: float = 0.0) -> PauseDone:
    """Pause ``key`` (of ``pool``) or ``partition`` (``pool.N``); for a partition, wait up to
    ``wait`` seconds for its holder to stop."""
    store = paused_store(app)
    try:
        if key is not None:
            chosen = key_pool(app, store, key, pool, resuming=False)
            index = partition_for(key, settings_of(app).partitions(chosen))
            return PauseDone(*store.pause_key(chosen, key, index, by))
        assert partition is not None
        chosen, index = parse_partition(app, partition)
        pause, new = store.pause_partition(chosen, index, by)
        return _stopped(app, store, pause, new, wait)
    finally:
        store.client.close()


def _stopped(app: Celery, store: PauseStore, pause: Pause, new: bool, wait: float) -> PauseDone:
    queue = settings_of(app).queue_name(pause.pool, pause.partition)
    deadline = time.monotonic() + wait
    broker = _broker_of(app)
    woken_at = -WAKE_EVERY
    try:
        while True:
            if broker is not None and time.monotonic() - woken_at >= WAKE_EVERY:
                # Unblock an idle holder's fetch so that it reads the pause now, not when the
                # fetch times out; again each second, as a wake can fall between two fetches.
                # A refusal (an ACL without CLIENT) only costs that time-out.
                with suppress(Exception):
                    wake_fetches(broker.client, queue)
                woken_at = time.monotonic()
            holder = read_holders(store.client, store.keys, [queue]).get(queue)
            shown = [p for p in store.paused([pause.pool])
                     if p.key is None and p.partition == pause.partition]
            current = shown[0] if shown else pause
            if holder is None or current.stopped_by or time.monotonic() >= deadline:
                return PauseDone(current, new, holder.describe() if holder else None,
                                 bool(current.stopped_by))
            time.sleep(0.1)
    finally:
        if broker is not None:
            broker.close()


def _broker_of(app: Celery) -> BrokerRedis | None:
    """A client to the app's Redis broker, to wake the holder; None on other brokers, or when
    it cannot be reached (the holder then reads the pause when its fetch times out)."""
    try:
        return broker_redis(app)
    except Exception:  # noqa: BLE001 - unreachable: the holder sees the pause later
        return None


def resume_target(app: Celery, *, by: str, key: str | None = None, pool: str | None = None,
                  partition: str | None = None) -> tuple[Resumed, str | None]:
    """Resume ``key`` or ``partition``; returns what was done and the queue messages went to."""
    store = paused_store(app)
    try:
        if key is not None:
            chosen = key_pool(app, store, key, pool, resuming=True)
            queue, requeue = replay_target(app, chosen, key)
            return store.resume_key(chosen, key, queue, by, requeue=requeue), queue
        assert partition is not None
        chosen, index = parse_partition(app, partition)
        return store.resume_partition(chosen, index, by), None
    finally:
        store.client.close()


def _target(key: str | None, partition: str | None) -> None:
    if (key is None) == (partition is None):
        raise click.UsageError("pass either --key KEY or --partition POOL.N")


def _run(action: Any) -> Any:
    try:
        return action()
    except PartitioningError as exc:
        raise click.ClickException(str(exc)) from None
    except RedisError as exc:
        raise click.ClickException(f"the partitioning store cannot be reached: {exc}; "
                                   "nothing was changed") from None


@click.command(name="pause")
@click.option("--key", default=None, help="Pause this partition key.")
@click.option("--pool", default=None, help="The key's pool (needed with several pools).")
@click.option("--partition", default=None, metavar="POOL.N", help="Pause this partition.")
@click.option("--wait", type=float, default=WAIT, show_default=True, metavar="SECONDS",
              help="With --partition: how long to wait for its holder to stop.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def pause_command(ctx: click.Context, *, key: str | None, pool: str | None,
                  partition: str | None, wait: float, as_json: bool) -> None:
    """Pause a key (its messages are set aside in order, other keys go on) or a partition
    (its worker stops between two messages and keeps its lease) until `resume`."""
    _target(key, partition)
    app = app_of(ctx, "pause")
    done: PauseDone = _run(lambda: pause_target(app, by=getpass.getuser(), key=key, pool=pool,
                                                partition=partition, wait=wait))
    pause = done.pause
    if as_json:
        click.echo(json.dumps({"action": "pause", "new": done.new, "holder": done.holder,
                               "stopped": done.stopped, "pause": pause.as_dict()}, indent=2))
        return
    if not done.new:
        click.echo(f"{pause.what} is paused already (since {pause.at} by {pause.by})")
    elif pause.key is not None:
        click.echo(f"paused {pause.what} (partition {pause.pool}.{pause.partition}) by "
                   f"{pause.by} at {pause.at}: its messages are set aside in order until "
                   f"`resume --key`")
    else:
        click.echo(f"paused {pause.what} by {pause.by} at {pause.at}")
    if pause.key is None:
        click.echo(_holder_line(done))


def _holder_line(done: PauseDone) -> str:
    if done.holder is None:
        return "  no worker holds it now: the next holder stops before its first message"
    if done.stopped:
        return f"  its holder {done.holder} has stopped (lease kept)"
    return (f"  its holder {done.holder} has not stopped yet (a task still running?): it stops "
            "before its next message")


@click.command(name="resume")
@click.option("--key", default=None, help="Resume this partition key.")
@click.option("--pool", default=None, help="The key's pool (needed if paused in several).")
@click.option("--partition", default=None, metavar="POOL.N", help="Resume this partition.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def resume_command(ctx: click.Context, *, key: str | None, pool: str | None,
                   partition: str | None, as_json: bool) -> None:
    """Resume a paused key (its set-aside messages run next, in order, ahead of newer ones)
    or a paused partition (its worker fetches again). Resuming what is not paused is an
    error that changes nothing."""
    _target(key, partition)
    app = app_of(ctx, "resume")
    done, queue = _run(lambda: resume_target(app, by=getpass.getuser(), key=key, pool=pool,
                                             partition=partition))
    pause = done.pause
    if as_json:
        click.echo(json.dumps({"action": "resume", "pause": pause.as_dict(), "queue": queue,
                               "held_by": done.held_by,
                               "messages": [asdict(m) for m in done.released]}, indent=2))
        return
    click.echo(f"resumed {pause.what} (paused since {pause.at} by {pause.by})")
    if pause.key is None:
        click.echo("  its holder fetches again within about a second")
    elif done.held_by is not None:
        click.echo(f"  its set-aside messages stay set aside behind {done.held_by}")
    else:
        click.echo(f"  released {len(done.released)} message(s) to {queue}, in order, ahead of "
                   "newer ones")
        for m in done.released:
            click.echo(f"  {m.id}  {m.task}  {m.args[:60]}")
