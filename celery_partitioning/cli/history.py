"""``celery -A proj partitioning dead-letters history``: what replays and discards did.

Every ``replay`` and ``discard`` appends a record to the pool's dead-letter log
(``store/deadletters.py``, ``dl-log:{pool}``): when, which key, the dead letter, and the
messages it re-queued or dropped (a discard keeps their raw payloads, so a message dropped
by mistake can still be recovered by hand). This command reads it; nothing else does.
"""

from __future__ import annotations

import json
from typing import Any

import click
from redis.exceptions import RedisError

from ..errors import PartitioningError
from ..state import settings_of
from .common import table
from .deadletters import store_for_app

__all__ = ["history_command"]


def _row(event: dict[str, Any]) -> tuple[str, ...]:
    letter = event.get("dead_letter") or {}
    return (str(event.get("at", "?")), str(event.get("action", "?")), str(event.get("pool", "?")),
            str(event.get("key", "?")), str(len(event.get("messages") or [])),
            str(letter.get("task", "?")), str(letter.get("error", ""))[:60])


def render_history(events: list[dict[str, Any]]) -> str:
    return table([("AT", "ACTION", "POOL", "KEY", "MESSAGES", "TASK", "ERROR"), *map(_row, events)])


@click.command(name="history")
@click.option("--pool", "pools", multiple=True, help="Only this pool (repeatable).")
@click.option("--key", default=None, help="Only this partition key.")
@click.option("--limit", type=int, default=50, show_default=True,
              help="Show the last N records (0: all).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: the whole records, with the raw payloads a discard dropped.")
@click.pass_context
def history_command(ctx: click.Context, pools: tuple[str, ...], key: str | None, limit: int,
                    as_json: bool) -> None:
    """Show past replays and discards (the dead-letter log), oldest first."""
    app = ctx.obj.app
    try:
        settings = settings_of(app)
        for pool in pools:
            settings.partitions(pool)  # an unknown pool: one line naming the known ones
        store = store_for_app(app)
    except PartitioningError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        events = [e for pool in (pools or tuple(settings.pools)) for e in store.history(pool)
                  if key is None or e.get("key") == key]
    except RedisError as exc:
        raise click.ClickException(f"the dead-letter store cannot be reached: {exc}") from None
    finally:
        store.client.close()
    events.sort(key=lambda e: str(e.get("at")))
    if limit > 0:
        events = events[-limit:]
    if as_json:
        click.echo(json.dumps(events, indent=2))
    elif not events:
        click.echo("no replays or discards recorded")
    else:
        click.echo(render_history(events))
