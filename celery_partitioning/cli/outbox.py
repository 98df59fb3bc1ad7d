"""``celery -A proj partitioning outbox relay``: publish committed outbox rows (Django).

The relay itself is ``celery_partitioning.contrib.django.relay``; this command sets Django
up when the app module did not, runs one relay until SIGTERM/SIGINT and exits 0. A second
relay on the same database waits as a standby (a lease in the Redis store).
"""

from __future__ import annotations

import faulthandler
import signal

import click
from celery.bin.base import CeleryCommand

from ..exits import stop_on_signal

__all__ = ["outbox"]


@click.group(name="outbox")
def outbox() -> None:
    """The transactional outbox (celery_partitioning.contrib.django.outbox)."""


@outbox.command(name="relay", cls=CeleryCommand)
@click.option("--database", default="default", show_default=True,
              help="The Django database alias whose outbox to relay.")
@click.option("--batch", type=click.IntRange(min=1), default=500, show_default=True,
              help="Rows published, confirmed and deleted per round.")
@click.option("--poll", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              help="Seconds between two looks at an idle outbox (SQLite; PostgreSQL waits "
                   "for NOTIFY and looks anyway at least every max(poll, 5) seconds).")
@click.option("-l", "--loglevel", default="info", show_default=True)
@click.pass_context
def relay_command(ctx: click.Context, database: str, batch: int, poll: float,
                  loglevel: str) -> None:
    """Publish committed outbox rows in commit order, then delete them (one active relay
    per database; others wait as standbys)."""
    import logging

    from ..contrib.django.relay import Relay, setup_django

    logging.basicConfig(level=loglevel.upper(),
                        format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    setup_django()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a relay is
    Relay(ctx.obj.app, using=database, batch=batch, poll=poll, stop=stop_on_signal()).run()


@outbox.command(name="status", cls=CeleryCommand)
@click.option("--database", default="default", show_default=True,
              help="The Django database alias whose outbox to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status_command(ctx: click.Context, database: str, as_json: bool) -> None:
    """Messages waiting in the outbox, the oldest one's age, and the active relay."""
    import json
    from dataclasses import asdict

    from ..contrib.django.relay import outbox_status, setup_django

    setup_django()
    found = outbox_status(ctx.obj.app, database)
    if as_json:
        click.echo(json.dumps(asdict(found)))
        return
    age = "-" if found.oldest_age is None else f"{found.oldest_age:.1f}s"
    click.echo(f"outbox ({found.database}): {found.waiting} waiting, oldest {age}; relay: "
               f"{found.relay or 'none (start `celery partitioning outbox relay`)'}")
