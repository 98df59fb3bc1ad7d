"""What the ``partitioning`` commands share: the app, usage errors, tables, AMQP queue reads."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..exits import EXIT_USAGE
from ..state import settings_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["app_of", "declared", "fail", "known_pools", "short", "table"]


def app_of(ctx: click.Context, command: str) -> Celery:
    """The app of celery's root command (``-A``), inherited through ``ctx.obj``."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError(f"no Celery app: run it as `celery -A proj partitioning {command} ...`")
    return app


def known_pools(app: Celery, pools: Sequence[str]) -> None:
    """Exit 2 naming the configured pools when ``pools`` names another."""
    configured = settings_of(app).pools
    unknown = [p for p in pools if p not in configured]
    if unknown:
        fail(f"unknown pool(s) {', '.join(unknown)}; configured: {', '.join(configured)}")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(code)


def short(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the header first) in aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def declared(conn: Any, queue: str) -> tuple[int, int] | None:
    """AMQP: ``(messages, consumers)`` of ``queue`` (a passive declare); None when unknown."""
    channel = conn.channel()
    try:
        _name, depth, consumers = channel.queue_declare(queue=queue, passive=True)
        return int(depth), int(consumers or 0)
    except conn.channel_errors:
        return None
    finally:
        with contextlib.suppress(Exception):
            channel.close()
