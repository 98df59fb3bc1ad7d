"""``celery -A proj partitioning purge``: empty partition queues, which ``celery purge`` leaves alone."""

from __future__ import annotations

import click
from celery.bin.base import CeleryCommand
from kombu.utils.url import maybe_sanitize_url

from .errors import PartitioningError
from .purge import plan_purge, purge
from .worker.supervisor import EXIT_UNCLEAN, EXIT_USAGE

__all__ = ["purge_command"]


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(code)


@click.command(name="purge", cls=CeleryCommand)
@click.option("--pool", "pools", multiple=True, metavar="NAME",
              help="Only this pool's partitions (repeat for several). Default: every pool.")
@click.option("--partitions", metavar="SPEC",
              help="Only these partition indexes of each selected pool, e.g. 0-3,7. Default: all.")
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
        _fail(str(exc), EXIT_USAGE)
    except (*app.connection_for_read().connection_errors, OSError) as exc:
        _fail(f"cannot read the partitions from {broker}: {exc}; nothing was deleted", EXIT_UNCLEAN)
    live = [p for p in plans if p.consumer is not None]
    if live and not while_running:
        for p in live:
            click.echo(f"{p.queue}: consumed by {p.consumer}", err=True)
        _fail(f"{len(live)} selected partition(s) are being consumed; stop their workers, or pass "
              "--while-running to purge under them; nothing was deleted", EXIT_UNCLEAN)
    total = sum(p.depth for p in plans)
    if not force:
        click.confirm(f"Delete the {total} message(s) waiting in {len(plans)} partition queue(s) "
                      f"on {broker}?", abort=True, err=True)
    try:
        deleted = purge(app, [p.queue for p in plans])
    except (*app.connection_for_read().connection_errors, OSError) as exc:
        _fail(f"purging on {broker} failed: {exc}", EXIT_UNCLEAN)
    for p in plans:
        running = f" (while consumed by {p.consumer})" if p.consumer else ""
        click.echo(f"{p.queue}: deleted {deleted[p.queue]} message(s){running}")
    click.echo(f"deleted {sum(deleted.values())} message(s) from {len(plans)} partition queue(s)")
