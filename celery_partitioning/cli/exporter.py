"""``celery partitioning exporter``: the queue-side Prometheus view, from anywhere.

Depth, lag, holder, parked and backoff keys per partition, depth skew and resizes per pool,
read from the broker and the store at every scrape (``metrics/queue.py``, which reuses
``status``'s collection), so it works while every worker is stopped. The per-message
counters, durations and hot keys only a worker knows come from ``worker --metrics-port``.
"""

from __future__ import annotations

import click
from celery.bin.base import CeleryCommand

from ..errors import PartitioningError
from .common import fail, known_pools

__all__ = ["exporter_command"]


@click.command(name="exporter", cls=CeleryCommand)
@click.option("--port", type=int, default=9808, show_default=True, help="Port of /metrics.")
@click.option("--address", default="", help="Address to listen on. Default: every interface.")
@click.option("--pool", "pools", multiple=True, metavar="NAME",
              help="Export only this pool (repeat for several). Default: every pool.")
@click.pass_context
def exporter_command(ctx: click.Context, *, port: int, address: str, pools: tuple[str, ...]) -> None:
    """Serve Prometheus metrics of the partition queues on --port until SIGTERM/Ctrl-C:
    depth, lag (age of the oldest message), holder, parked and backoff keys per partition;
    depth skew and resizes per pool. Needs celery-partitioning[prometheus]. Read only."""
    from ..metrics import require_prometheus

    app = ctx.obj.app
    try:
        require_prometheus("partitioning exporter")
        known_pools(app, pools)
        from ..metrics.server import build_registry, check_port, serve

        check_port(port, address)
    except PartitioningError as exc:
        fail(str(exc))
    raise SystemExit(serve(build_registry(app, pools), port, address))
