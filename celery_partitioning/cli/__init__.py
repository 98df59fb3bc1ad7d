"""The ``celery partitioning`` commands (entry point ``celery.commands``), thin wrappers:
``worker`` and ``status`` here, each other command in a module of its name."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click
from celery.bin.base import CeleryCommand
from kombu.utils.url import maybe_sanitize_url

from ..config import redis_namespace
from ..errors import PartitionConfigError, PartitioningError
from ..state import partitioning_of, settings_of
from ..tasks import pools_used_by
from ..validation import assert_valid_partition_keys, logged_above
from ..worker.preflight import check_guarantees, declare_partition_queues
from ..worker.resize import check_recorded_sizes
from ..worker.runtime import EVENTS_ENV, RELAY_ENV
from ..worker.startup import when_reachable
from ..worker.supervisor import (
    Supervisor,
    run_celery,
    select_partitions,
    share,
    spread,
    worker_argv,
)
from .common import fail, known_pools

__all__ = ["partitioning"]

#: Options of the ``celery`` root command that children must be started with too. Not
#: ``-b``/``--result-backend``: the root command exported them as CELERY_BROKER_URL and
#: CELERY_RESULT_BACKEND, which children inherit, and URLs with passwords must stay out of
#: command lines (``ps`` shows them to every user, ``--dry-run`` prints them).
_ROOT_OPTIONS = (("app", "-A"), ("loader", "--loader"), ("config", "--config"), ("workdir", "--workdir"))


def _app(ctx: click.Context) -> Any:
    return ctx.obj.app


def _root_options(ctx: click.Context, command_line: list[str] | None = None) -> list[str]:
    params = ctx.find_root().params
    argv: list[str] = []
    for name, flag in _ROOT_OPTIONS:
        value = params.get(name)
        if name == "app" and value is not None and not isinstance(value, str):
            # Celery 5.4 hands the loaded app object, not the -A text: read that text back
            value = _app_option(sys.argv if command_line is None else command_line)
        if value:
            argv += [flag, str(value)]
    return argv


def _app_option(command_line: list[str]) -> str | None:
    """The value of ``-A``/``--app`` on a ``celery`` command line (``-A x``, ``-Ax``,
    ``--app x``, ``--app=x``), or None."""
    for i, arg in enumerate(command_line):
        if arg in ("-A", "--app") and i + 1 < len(command_line):
            return command_line[i + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
        if arg.startswith("-A") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
    return None


class _SettingsCheckedGroup(click.Group):
    """Notes whether the command line asks for help, which must work with bad settings too."""

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        ctx.meta[_ASKS_HELP] = any(arg in ("--help", *ctx.help_option_names) for arg in args)
        return super().resolve_command(ctx, args)


_ASKS_HELP = "celery_partitioning.asks_help"


@click.group(name="partitioning", cls=_SettingsCheckedGroup)
@click.pass_context
def partitioning(ctx: click.Context) -> None:
    """Partitioned queues: per-key FIFO with parallelism across keys.

    \b
    worker   run the partition workers, supervised (the ordering promise)
    status   queue depth, unacked, oldest age, consumer, parked and paused keys per partition
    route    which pool, partition and queue a partition key goes to
    purge    delete the messages waiting in partition queues
    dead-letters  list, replay or discard dead letters and parked keys; history
    pause    pause a key or a partition (resume: let it run again, in order)
    resize   record a new partition count for a pool (keys keep their order)
    exporter serve Prometheus metrics of the partition queues
    """
    # Every command reads the settings: an invalid one is one line and exit 2, everywhere.
    app = getattr(ctx.obj, "app", None)
    if app is not None and not ctx.meta.get(_ASKS_HELP):
        try:
            settings_of(app)
            redis_namespace(app.conf)
        except PartitionConfigError as exc:
            fail(str(exc))


@partitioning.command(cls=CeleryCommand)
@click.option("--pool", "pools", multiple=True, metavar="NAME",
              help="Run only this pool's partitions (repeat for several). Default: the pools "
                   "in partitioning_worker_pools, else those some registered partitioned task "
                   "uses.")
@click.option("--partitions", metavar="SPEC",
              help="Run only these partitions: POOL:INDEXES, several separated by commas "
                   "(entity:0-5,global:0), or plain indexes (0-3,7 or 3) when one pool is "
                   "selected (a StatefulSet ordinal / systemd instance): this command holds "
                   "them and only them. Default: all the pools' partitions, shared with every "
                   "other `partitioning worker` running anywhere (each process holds about P/W "
                   "of a pool's P partitions; needs the Redis store).")
@click.option("-l", "--loglevel", default="info", show_default=True,
              help="Log level of the partition workers.")
@click.option("--processes", type=int, default=None, metavar="P",
              help="Worker processes to spread the selected partitions over (each partition "
                   "is a thread of one of them). Default: the number of CPUs, at most the "
                   "number of partitions.")
@click.option("--without-events", is_flag=True,
              help="Do not send task events (on by default, for Flower and `celery events`).")
@click.option("--without-relay", is_flag=True,
              help="Do not run the outbox relay (on by default when the Django outbox app is "
                   "installed; setting partitioning_outbox_relay).")
@click.option("--stop-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a warm shutdown may take before children are killed.")
@click.option("--dry-run", is_flag=True, help="Print the child worker commands and exit.")
@click.option("--metrics-port", type=int, default=None, metavar="PORT",
              help="Serve Prometheus metrics on this port (/metrics); needs the extra "
                   "celery-partitioning[prometheus]. See docs/monitoring.md.")
@click.option("--metrics-raw-keys", is_flag=True,
              help="Label hot keys with the keys themselves, not a digest of them.")
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker(ctx: click.Context, *, pools: tuple[str, ...], partitions: str | None, loglevel: str,
           processes: int | None, without_events: bool, without_relay: bool,
           stop_timeout: float, dry_run: bool,
           metrics_port: int | None, metrics_raw_keys: bool, worker_args: tuple[str, ...]) -> None:
    """Run and supervise the partition workers: a few processes, a thread per partition.

    Without --partitions each of the --processes `celery worker` processes is a member of
    the pools: the partitions are balanced over every member running anywhere (the same
    command on two hosts: each holds half), handed over between two messages as members join
    and leave. With --partitions they are dealt over the processes, pinned (a second command
    on the same partitions waits as a standby). A process consumes each partition it holds
    in a thread, one message at a time, in queue order. Each process is a Celery node
    (`celery inspect`, task events, `celery control shutdown`). Each partition holds its
    lease (RabbitMQ: single active consumer, and the lease when balanced) and puts a crashed
    predecessor's messages back at the head of its queue before it consumes. A dead process
    is restarted with backoff; SIGTERM/SIGINT stop all warmly. Without --pool (or pools
    named in --partitions) only the pools some registered partitioned task uses run (or those
    of the setting partitioning_worker_pools); the others are skipped, and said so once.
    Exit: 0 clean stop, 1 unclean, 2 bad usage. `-- ARGS`: to every `celery worker`."""
    app = _app(ctx)
    settings = settings_of(app)
    _check_registry(app)
    default, skipped = _default_pools(app, settings)
    try:
        selected = select_partitions(settings, pools, partitions, default_pools=default)
        if processes is None:
            processes = max(1, min(os.cpu_count() or 1, len(selected)))
        specs = share(selected, processes) if _balanced(settings, partitions) else \
            spread(selected, processes)
    except PartitioningError as exc:
        fail(str(exc))
    running = {spec.pool for spec in selected}
    skipped_note = _skipped_note([p for p in skipped if p not in running])
    argv_prefix = _root_options(ctx)
    extra = list(worker_args)

    def argv(spec: Any) -> list[str]:
        return worker_argv(spec, argv_prefix, loglevel, extra,
                           idle_queue=settings.idle_queue_name, events=not without_events)

    if dry_run:
        if skipped_note:
            click.echo(f"# {skipped_note}")
        for spec in specs:
            click.echo(f"# {spec.label}: {spec.describe}")
            click.echo(" ".join(maybe_sanitize_url(arg) if "://" in arg else arg
                                for arg in [sys.executable, "-m", "celery", *argv(spec)]))
        return
    metrics: Any = None  # --metrics-port: metrics/server.py
    try:
        _check_before_start(ctx, app, selected)
        if metrics_port is not None:
            from ..metrics.server import MetricsProcess

            metrics = MetricsProcess.for_worker(metrics_port, raw_keys=metrics_raw_keys)
    except PartitioningError as exc:
        fail(str(exc))
    if skipped_note:
        click.echo(f"[supervisor] {skipped_note}", err=False)
    env = _child_env(events=not without_events, relay=settings.outbox_relay and not without_relay)
    _preload_worker_modules()
    try:
        if metrics is not None:
            metrics.start(app, [(spec.pool, spec.index) for spec in selected])
        raise SystemExit(Supervisor(specs, lambda spec: run_celery(argv(spec)), env=env,
                                    stop_timeout=stop_timeout).run())
    finally:
        if metrics is not None:
            metrics.stop()


def _child_env(*, events: bool, relay: bool) -> dict[str, str]:
    """The partition worker processes' environment: ours, with what the options turned off."""
    return {**os.environ, EVENTS_ENV: "1" if events else "0", RELAY_ENV: "1" if relay else "0"}


def _balanced(settings: Any, partitions: str | None) -> bool:
    """Share the pools with the other members (the default), or hold fixed partitions
    (``--partitions``; also without a Redis store, where members cannot agree on shares)."""
    return partitions is None and settings.redis is not None


def _check_before_start(ctx: click.Context, app: Any, selected: list[Any]) -> None:
    """Guarantees, queues and recorded sizes; a fleet started during a failover waits for a
    master, as its children do."""
    def checks() -> list[str]:
        problems = check_guarantees(app)
        declare_partition_queues(app, [(spec.pool, spec.index) for spec in selected])
        check_recorded_sizes(app, {spec.pool for spec in selected}, command=_app_command(ctx))
        return problems

    for problem in when_reachable(checks, lambda line: click.echo(line, err=True),
                                  "partition worker checks"):
        click.echo(f"Warning: running without a guarantee (partitioning_allow_degraded): "
                   f"{problem}", err=True)


def _default_pools(app: Any, settings: Any) -> tuple[list[str], list[str]]:
    """The pools run without --pool, and those skipped (no registered task uses them)."""
    if settings.worker_pools is not None:
        return list(settings.worker_pools), []
    used = [pool for pool in pools_used_by(app.tasks.values()) if pool in settings.pools]
    if not used:  # no partitioned task registered at all: run everything
        return list(settings.pools), []
    return used, [pool for pool in settings.pools if pool not in used]


def _skipped_note(skipped: list[str]) -> str | None:
    if not skipped:
        return None
    return (f"not running pool(s) {', '.join(skipped)}: no registered partitioned task uses "
            "them (run them with --pool NAME, or list the pools in partitioning_worker_pools "
            "when their tasks are only sent by name from elsewhere)")


def _app_command(ctx: click.Context) -> str:
    """``celery -A proj`` as the user typed it, for commands we suggest."""
    return " ".join(["celery", *_root_options(ctx)])


def _check_registry(app: Any) -> None:
    """Import the task modules and refuse an invalid registry, printing its problems once."""
    state = partitioning_of(app)
    if not app.finalized:
        state.log_registry_problems = False  # reported here, not also by the finalize check
    app.loader.import_default_modules()
    try:
        assert_valid_partition_keys(app)
    except PartitioningError as exc:
        if state.registry_problems_logged:
            fail(f"refusing to start partition workers: {logged_above(exc)}")
        fail(f"refusing to start partition workers.\n{exc}")


def _preload_worker_modules() -> None:
    """Import what every partition worker process imports, once, before they are forked from
    this process: they share these pages. (``compat.late_bound_consumer_tracers`` undoes the
    early binding of ``build_tracer`` this causes, for SDKs that patch it, such as Sentry.)"""
    import celery.apps.worker
    import celery.worker.consumer  # noqa: F401

    from ..worker import hooks  # noqa: F401


@partitioning.command(cls=CeleryCommand)
@click.option("--pool", "pools", multiple=True, metavar="NAME",
              help="Show only this pool (repeat for several). Default: every pool.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option("--interval", type=float, default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--stall-after", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Call a partition STALLED when its lease holder took no message for this "
                   "long while its queue has messages.")
@click.pass_context
def status(ctx: click.Context, *, pools: tuple[str, ...], as_json: bool, watch: bool,
           interval: float, stall_after: float) -> None:
    """Show each partition: queue depth, unacked messages, age of the oldest message,
    lease holder (host/pid) or "no consumer", parked keys, what is paused (then a list of the
    pauses: since when, by whom); then pools no worker runs by
    default, queues beyond a pool's size that still hold messages (STRANDED) and a recorded
    size other than the configured one; then, for projections with a checkpoint, the keys,
    messages applied and messages skipped as already applied. Read only."""
    from ..checkpoint_runner import checkpoint_stats, render_checkpoint_stats
    from .poolnotes import collect_pool_notes, render_pool_notes
    from .resize import collect_resizes, render_resizes
    from .status import collect_pauses, collect_status, render_pauses, render_table, status_json

    app = _app(ctx)
    known_pools(app, pools)
    while True:
        try:
            rows = collect_status(app, pools, stall_after=stall_after)
        except (*app.connection_for_read().connection_errors, OSError) as exc:
            click.echo(f"Error: cannot read the partitions from "
                       f"{maybe_sanitize_url(app.conf.broker_url or '')}: {exc}", err=True)
            raise SystemExit(1) from None
        checkpoints = checkpoint_stats(app)
        resizes = collect_resizes(app, pools)
        notes = collect_pool_notes(app, pools)
        pauses = collect_pauses(app, pools)
        if as_json:
            found = json.loads(status_json(rows, checkpoints))
            found["paused"] = [p.as_dict() for p in pauses]
            if resizes:
                found["resizes"] = [r.as_dict() for r in resizes]
            found.update(notes.as_dict())
            click.echo(json.dumps(found, indent=2))
        else:
            if watch:
                click.clear()
            broker = maybe_sanitize_url(app.conf.broker_url or "")
            click.echo(f"broker {broker}  ({time.strftime('%H:%M:%S')})")
            click.echo(render_table(rows))
            if pauses:
                click.echo(render_pauses(pauses))
            if resizes:
                click.echo(render_resizes(resizes))
            if notes:
                click.echo(render_pool_notes(notes, _app_command(ctx)))
            if checkpoints is not None:
                click.echo("")
                click.echo(render_checkpoint_stats(checkpoints))
        if not watch:
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


from .route import route_command  # noqa: E402 - the route command

partitioning.add_command(route_command)

from .deadletters import dead_letters  # noqa: E402 - the dead-letters sub-group
from .history import history_command  # noqa: E402 - dead-letters history

dead_letters.add_command(history_command)
partitioning.add_command(dead_letters)

from .pausing import pause_command, resume_command  # noqa: E402 - pause and resume

partitioning.add_command(pause_command)
partitioning.add_command(resume_command)

from .purge import purge_command  # noqa: E402 - the purge command

partitioning.add_command(purge_command)

from .resize import resize_command  # noqa: E402 - the resize command

partitioning.add_command(resize_command)

from .exporter import exporter_command  # noqa: E402 - the exporter command

partitioning.add_command(exporter_command)

from .outbox import outbox  # noqa: E402 - the outbox group (Django)

partitioning.add_command(outbox)
