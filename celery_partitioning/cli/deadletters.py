"""``celery -A proj partitioning dead-letters list|replay|skip|discard [--all]``: operate dead
letters and parked keys."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
from redis.exceptions import RedisError

from ..errors import DeadLetterError, PartitioningError
from ..hashing import partition_for
from ..message import MessageSummary
from ..state import redis_client, redis_keys, settings_of
from ..store.deadletters import DeadLetterStore
from ..store.letters import DeadLetterView
from ..store.requeue import Requeue, requeue_for
from ..store.skipping import SkipStore
from .common import app_of, short, table

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["KeyAction", "act_on_key", "dead_letters", "replay_target", "store_for_app"]


def store_for_app(app: Celery) -> DeadLetterStore:
    """The dead-letter store of an app (``partitioning_redis_url``, namespace of its broker)."""
    settings = settings_of(app)
    if settings.redis is None:
        raise DeadLetterError(
            "no Redis store is configured for dead letters: set partitioning_redis_url "
            "(Django: CELERY_PARTITIONING_REDIS_URL), or use a Redis broker or result backend")
    return DeadLetterStore(redis_client(settings.redis), redis_keys(app))


def replay_target(app: Celery, pool: str, key: str) -> tuple[str, Requeue]:
    """The queue a replay of ``key`` goes to, and how (``store/requeue.py``)."""
    settings = settings_of(app)
    index = partition_for(key, settings.partitions(pool))
    return settings.queue_name(pool, index), requeue_for(app, pool, index)


@dataclass(frozen=True)
class KeyAction:
    """What replay, skip or discard did: the messages it released or dropped (discard)."""

    action: str
    pool: str
    key: str
    messages: list[MessageSummary]
    skipped: MessageSummary | None = None
    #: Replay and skip: where the messages went, and whether to its head (else published).
    queue: str | None = None
    at_head: bool = False


def act_on_key(app: Celery, store: DeadLetterStore, pool: str, key: str, action: str) -> KeyAction:
    """Replay, skip or discard the dead letter of ``key`` in ``pool``: the ``dead-letters``
    commands and the admin pages. ``DeadLetterError`` when there is nothing to do."""
    if action == "discard":
        return KeyAction(action, pool, key, SkipStore(store).discard_key(pool, key))
    queue, requeue = replay_target(app, pool, key)
    if action == "replay":
        return KeyAction(action, pool, key, store.replay(pool, key, queue, requeue=requeue),
                         queue=queue, at_head=requeue.at_head)
    done = SkipStore(store).skip(pool, key, queue, requeue=requeue)
    return KeyAction(action, pool, key, done.released, done.skipped, queue, requeue.at_head)


def _pools(app: Celery, wanted: Sequence[str]) -> list[str]:
    settings = settings_of(app)
    for pool in wanted:
        settings.partitions(pool)  # PartitionConfigError naming the known pools
    return list(wanted) or list(settings.pools)


@contextlib.contextmanager
def _opened(app: Celery) -> Iterator[DeadLetterStore]:
    """The app's dead-letter store, its errors and the settings' as one line each."""
    try:
        store = store_for_app(app)
        yield store
    except PartitioningError as exc:
        raise click.ClickException(str(exc)) from None
    except RedisError as exc:
        where = store.client.connection_pool.connection_kwargs
        raise click.ClickException(
            f"the dead-letter store (Redis {where.get('host', '?')}:{where.get('port', '?')}"
            f"/{where.get('db', 0)}) cannot be reached: {exc}; nothing was changed") from None


def _one_pool(store: DeadLetterStore, pools: list[str], key: str, explicit: bool,
              action: str) -> str:
    if explicit and len(pools) == 1:
        return pools[0]
    found = [v.dead_letter.pool for v in store.find(pools, key)]
    if not found and action == "discard":  # only skip-policy dead letters: discard those
        found = sorted({v.dead_letter.pool for v in SkipStore(store).find(pools, key)})
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise click.ClickException(f"key {key!r} is parked in several pools ({', '.join(found)}); "
                                   "pass --pool")
    raise store.not_parked_error(pools, key, action)


def _table(views: list[DeadLetterView]) -> str:
    return table([("POOL", "KEY", "TASK", "TASK ID", "TRIES", "REASON", "POLICY", "FAILED AT",
                   "PARKED", "ERROR")] + [
        (d.pool, short(d.key, 40), d.task, d.id, str(d.attempts), d.reason, d.policy, d.failed_at,
         str(len(v.parked)) if d.policy == "park" else "-", short(d.error, 60))
        for v in views for d in [v.dead_letter]])


@click.group(name="dead-letters")
def dead_letters() -> None:
    """Dead letters and parked keys: list, replay (in order), skip or discard them."""


@dead_letters.command(name="list")
@click.option("--pool", "pools", multiple=True, help="Only this pool (repeatable).")
@click.option("--key", default=None, help="Only this partition key.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with tracebacks and parked messages).")
@click.pass_context
def list_command(ctx: click.Context, pools: tuple[str, ...], key: str | None, as_json: bool) -> None:
    """List dead letters: the failed message of each parked key and what is parked behind it,
    and the failed messages of tasks with on_failure="skip" (their keys went on)."""
    app = app_of(ctx, "dead-letters")
    with _opened(app) as store:
        selected = _pools(app, pools)
        views = sorted([*store.find(selected, key), *SkipStore(store).find(selected, key)],
                       key=lambda v: (v.dead_letter.failed_at, v.dead_letter.pool))
    if as_json:
        click.echo(json.dumps([v.as_dict() for v in views], indent=2))
    elif not views:
        click.echo("no dead letters")
    else:
        click.echo(_table(views))


def _operate(ctx: click.Context, pools: tuple[str, ...], key: str, action: str,
             as_json: bool) -> None:
    app = app_of(ctx, "dead-letters")
    with _opened(app) as store:
        selected = _pools(app, pools)
        pool = _one_pool(store, selected, key, explicit=bool(pools), action=action)
        done = act_on_key(app, store, pool, key, action)
    messages, skipped = done.messages, done.skipped
    where: dict[str, Any] = {} if done.queue is None else {
        "queue": done.queue, "via": "head" if done.at_head else "publish"}
    if as_json:
        extra = {"skipped": skipped.__dict__} if skipped is not None else {}
        click.echo(json.dumps({"action": action, "pool": pool, "key": key, **where, **extra,
                               "messages": [m.__dict__ for m in messages]}, indent=2))
        return
    if skipped is not None:
        click.echo(f"skipped {skipped.id} {skipped.task} {short(skipped.args, 60)} "
                   f"of key {key!r} (recorded in the dead-letter log, not run)")
    verb = {"replay": "replayed", "skip": "released", "discard": "discarded"}[action]
    if not where:
        target = " (recorded: `dead-letters history` shows them)"
    elif where["via"] == "head":
        target = f" to the head of {where['queue']}"
    else:
        target = f" to {where['queue']} (published; newer messages of the key wait behind them)"
    click.echo(f"{verb} {len(messages)} message(s) of key {key!r} (pool {pool}){target}; "
               "the key is unparked")
    for m in messages:
        click.echo(f"  {m.id}  {m.task}  {short(m.args, 60)}")


@dead_letters.command(name="replay")
@click.option("--key", required=True, help="The parked partition key.")
@click.option("--pool", "pools", multiple=True, help="Its pool (needed if parked in several).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def replay_command(ctx: click.Context, key: str, pools: tuple[str, ...], as_json: bool) -> None:
    """Re-queue the failed message, then the parked ones, in original order, and unpark the key.

    They go ahead of newer messages of the key. Replaying a key that is not parked (never
    was, or replayed already) is an error that changes nothing.
    """
    _operate(ctx, pools, key, "replay", as_json)


@dead_letters.command(name="skip")
@click.option("--key", required=True, help="The parked partition key.")
@click.option("--pool", "pools", multiple=True, help="Its pool (needed if parked in several).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def skip_command(ctx: click.Context, key: str, pools: tuple[str, ...], as_json: bool) -> None:
    """Drop the failed message (keeping a record of it), unpark the key, and run the messages
    parked behind it next, in original order, ahead of newer messages of the key.

    Skipping a key that is not parked is an error that changes nothing.
    """
    _operate(ctx, pools, key, "skip", as_json)


@dead_letters.command(name="discard")
@click.option("--key", default=None, help="The parked partition key.")
@click.option("--all", "every", is_flag=True,
              help="Every dead letter (of --pool, else of every pool), with what is parked "
                   "behind each.")
@click.option("--pool", "pools", multiple=True, help="Its pool (needed if parked in several).")
@click.option("--yes", "-y", "yes", is_flag=True, help="With --all: do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def discard_command(ctx: click.Context, *, key: str | None, every: bool, pools: tuple[str, ...],
                    yes: bool, as_json: bool) -> None:
    """Drop the failed and parked messages of a key (keeping a record of them) and unpark it;
    also drops the key's dead letters of on_failure="skip" tasks.

    With --all, every dead letter of the selected pools goes, each with its parked messages
    (asks first unless --yes).
    """
    if every == (key is not None):
        raise click.UsageError("pass either --key KEY or --all")
    if key is not None:
        _operate(ctx, pools, key, "discard", as_json)
        return
    _discard_all(ctx, pools, yes, as_json)


def _discard_all(ctx: click.Context, pools: tuple[str, ...], yes: bool, as_json: bool) -> None:
    app = app_of(ctx, "dead-letters")
    with _opened(app) as store:
        selected = _pools(app, pools)
        found = store.find(selected)
        skipped = SkipStore(store).find(selected)
        if not found and not skipped:
            if as_json:
                click.echo(json.dumps({"action": "discard", "pools": selected, "dead_letters": 0,
                                       "messages": 0, "keys": []}, indent=2))
            else:
                click.echo(f"no dead letters in pool(s) {', '.join(selected)}; nothing discarded")
            return
        parked = sum(len(v.parked) for v in found)
        if not yes:
            click.confirm(f"discard {len(found) + len(skipped)} dead letter(s) and {parked} "
                          f"message(s) parked behind them in pool(s) {', '.join(selected)}?",
                          abort=True, err=True)
        dropped = store.discard_all(selected)
        dropped += [(d, [d.summary()]) for d in SkipStore(store).discard(selected)]
    messages = sum(len(m) for _, m in dropped)
    if as_json:
        click.echo(json.dumps({
            "action": "discard", "pools": selected, "dead_letters": len(dropped),
            "messages": messages,
            "keys": [{"pool": letter.pool, "key": letter.key,
                      "messages": [m.__dict__ for m in dropped_messages]}
                     for letter, dropped_messages in dropped]}, indent=2))
        return
    click.echo(f"discarded {len(dropped)} dead letter(s), {messages} message(s) in all "
               f"(recorded in the dead-letter log); their keys are unparked")
    for letter, dropped_messages in dropped:
        click.echo(f"  {letter.pool}  {short(letter.key, 40)}  {len(dropped_messages)} "
                   "message(s)")
