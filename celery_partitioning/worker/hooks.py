"""Wiring a partition worker process: Celery signals and bootsteps around the partition threads.

``install(app)`` imports this module in a ``celery worker`` process only, at ``celeryd_init``
(:func:`configure_worker`). Every worker of the app gets guarded remote control
(``control.py``); a plain worker refuses ``-Q`` of a partition queue.

A process the supervisor started (``PARTITIONS_ENV`` set) also:

1. at ``celeryd_init``: checks Celery's internals (``compat``), watches its supervisor
   (``orphan.py``), insists on ``-Q <idle queue>`` (its own consumer takes no task), forces
   ``acks_late`` and no rate limits, turns task events on and adds :class:`PartitionsStep`;
2. at ``worker_init``: refuses a setup that cannot keep a guarantee and builds the
   :class:`~.runtime.WorkerRuntime` (:func:`build_runtime`); the banner says what runs the tasks;
3. starts one unit per partition (``lifecycle.Partition``), under a ``balancer.Fleet`` when
   there is a Redis store;
4. on a warm stop closes the step first: running tasks finish, leases are released. A first
   SIGINT exits 0 as SIGTERM does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from celery import bootsteps, signals
from kombu.entity import Queue

from .. import compat
from ..config import PartitioningSettings
from ..errors import PartitioningError
from ..exits import EXIT_UNCLEAN
from ..metrics import METRICS_ENV
from ..state import partitioning_of, redis_client, redis_keys, replicas_of
from ..store.requeue import pushes_to_head
from ..store.resize import ResizeStore
from .balancer import Fleet
from .banner import install_banner
from .control import ALLOW_PLAIN_CONSUMER_ENV, install_guards
from .executor import Executor
from .lifecycle import Partition, unit_of, wake
from .orphan import start_supervisor_watch
from .outbox_relay import RelayStep, describe_relays, relay_requested
from .pipeline import build_partition
from .preflight import check_guarantees, declare_partition_queues, warn_degraded
from .resize import check_recorded_size
from .runtime import (
    BALANCE_ENV,
    EVENTS_ENV,
    PARTITIONS_ENV,
    WorkerRuntime,
    attach_worker,
    current_worker,
    parse_partitions,
)
from .startup import when_reachable
from .task_patch import enable_in_place_retry

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["configure_worker", "build_runtime", "PartitionsStep", "FORCED_WORKER_SETTINGS",
           "ALLOW_PLAIN_CONSUMER_ENV"]

logger = logging.getLogger("celery_partitioning.worker")

#: Seconds a store command may take: they are short, a longer silence is a dead server.
STORE_SOCKET_TIMEOUT: Final = 10.0
#: Settings every partition worker process runs with, whatever the app says.
FORCED_WORKER_SETTINGS: Final = {
    "worker_prefetch_multiplier": 1,
    "worker_concurrency": 1,
    "worker_disable_rate_limits": True,
    "task_acks_late": True,
}


def configure_worker(app: Celery, options: dict[str, Any]) -> None:
    """``celeryd_init`` of any ``celery worker`` of an installed app (see the module docstring)."""
    state = partitioning_of(app)
    try:
        install_guards()  # remote control cannot give a partition a second consumer
    except PartitioningError as exc:
        raise SystemExit(f"celery-partitioning: {exc}") from None
    wanted = options.get("queues")
    names = [q.strip() for q in wanted.split(",")] if isinstance(wanted, str) else list(wanted or [])
    value = os.environ.get(PARTITIONS_ENV) or None
    if value is None:
        _refuse_partition_queues(state.settings, names)
        return
    settings = state.settings
    try:
        hosted = parse_partitions(value, settings)
        compat.check_worker_internals()
    except PartitioningError as exc:
        raise SystemExit(f"celery-partitioning: {exc}") from None
    compat.late_bound_consumer_tracers()
    label = ",".join(f"{pool}.{index}" for pool, index in hosted)
    start_supervisor_watch(label, compat.request_warm_stop)
    idle = settings.idle_queue_name
    if names != [idle]:
        raise SystemExit(f"celery-partitioning: a partition worker process consumes its "
                         f"partitions in threads and only the idle queue itself: -Q {idle} "
                         f"(got {names or 'none'}); start it with `celery partitioning worker`")
    concurrency = options.get("concurrency")
    if concurrency not in (None, 1):
        raise SystemExit(f"celery-partitioning: a partition worker process runs with -c 1 "
                         f"(its partitions are threads), got {concurrency}")
    app.amqp.queues.add(Queue(idle, app.amqp.default_exchange, routing_key=idle,
                              durable=False, auto_delete=True))
    app.conf.update(FORCED_WORKER_SETTINGS)
    if os.environ.get(EVENTS_ENV, "1") != "0":
        app.conf.worker_send_task_events = True
    app.steps["worker"].add(PartitionsStep)
    if relay_requested():
        app.steps["worker"].add(RelayStep)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            _build_runtime(app, sender, hosted)

    def on_after_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
        # Sent just before Celery prints its banner: say what runs the tasks.
        runtime = current_worker(app)
        if getattr(instance, "app", None) is app and runtime is not None:
            install_banner(instance, runtime, idle, describe_relays(instance))

    signals.worker_init.connect(on_worker_init, weak=False)
    signals.celeryd_after_setup.connect(on_after_setup, weak=False)


def _refuse_partition_queues(settings: PartitioningSettings, names: list[str]) -> None:
    """A plain ``celery worker -Q <partition queue>`` stops before it consumes: it would
    hold no lease and run a key's messages concurrently, out of order."""
    partition_queues = {settings.queue_name(pool, index): (pool, index)
                        for pool, count in settings.pools.items() for index in range(count)}
    taken = [name for name in names if name in partition_queues]
    if not taken or os.environ.get(ALLOW_PLAIN_CONSUMER_ENV) == "1":
        return
    pool, index = partition_queues[taken[0]]
    raise SystemExit(
        f"celery-partitioning: this plain worker was asked to consume partition queue(s) "
        f"{', '.join(taken)}; a plain worker holds no lease and runs a key's messages in "
        f"parallel and out of order. Run `celery -A <app> partitioning worker` instead "
        f"(`--pool {pool} --partitions {index}` for just that partition), or set "
        f"{ALLOW_PLAIN_CONSUMER_ENV}=1 if you accept losing the ordering guarantee")


def _build_runtime(app: Celery, worker: Any, hosted: list[tuple[str, int]]) -> None:
    """Build and attach the runtime, waiting while the broker or the store is unreachable (a
    failover). Celery logs and swallows errors of signal receivers: exit instead."""
    def build() -> None:
        if current_worker(app) is not None:
            return
        runtime = build_runtime(app, worker, hosted)
        if os.environ.get(METRICS_ENV):  # partitioning worker --metrics-port
            from ..metrics.instruments import instrument

            instrument(app, runtime)
        attach_worker(app, runtime)

    try:
        when_reachable(build, logger.warning, "partition worker start-up")
    except PartitioningError as exc:
        logger.critical("%s", exc)
        raise SystemExit(f"celery-partitioning: {exc}") from None
    except Exception as exc:
        logger.critical("celery-partitioning: partition worker start-up failed", exc_info=True)
        raise SystemExit(f"celery-partitioning: partition worker start-up failed: {exc!r}") from None


def build_runtime(app: Celery, node: Any, hosted: list[tuple[str, int]], *,
                  fence: Callable[[str], None] | None = None) -> WorkerRuntime:
    """The WorkerRuntime of the partitions ``hosted``, not yet attached and with no thread:
    a PartitionRuntime each (``pipeline.build_partition``), the tasks patched for in-place
    retry, and the executor. ``node``: the Celery node (a ``WorkController`` or a stand-in);
    ``fence``: what a holder that lost its lease does (default: end the process)."""
    settings = partitioning_of(app).settings
    degraded = check_guarantees(app)  # refuses a setup that cannot keep a guarantee
    with app.connection_for_read() as conn:
        transport = str(conn.transport.driver_type)
    if transport == "amqp":
        declare_partition_queues(app, hosted)  # another queue type: one clear error
    hostname = str(node.hostname)
    runtime = WorkerRuntime(app=app, settings=settings, hostname=hostname, transport=transport,
                            balanced=os.environ.get(BALANCE_ENV) == "1")
    # One store client for the process; each partition fetches on a broker client of its own.
    store = (redis_client(settings.redis, replicas=replicas_of(settings),
                          max_connections=2 * len(hosted) + 16, timeout=STORE_SOCKET_TIMEOUT)
             if settings.redis is not None else None)
    keys = redis_keys(app)
    for task in app.tasks.values():
        task.acks_late = True
    at_head = pushes_to_head(app)  # the same for every partition: ask once
    resizes = ResizeStore(store, keys, settings.queue_prefix) if store is not None else None
    recorded = {pool: check_recorded_size(resizes, pool, settings.partitions(pool))
                for pool in dict.fromkeys(pool for pool, _ in hosted)} if resizes else {}
    for pool, index in hosted:
        partition = build_partition(runtime, pool, index, store=store, keys=keys,
                                    at_head=at_head, resizes=resizes,
                                    recorded=recorded.get(pool), fence=fence)
        runtime.partitions.append(partition)
        warn_degraded(partition.label, degraded)
    runtime.retry = enable_in_place_retry(app)
    runtime.executor = Executor(app, node)
    return runtime


class PartitionsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: the hosted partitions as units (``lifecycle.Partition``), started
    with the worker and stopped first when it stops."""

    label = "partitions"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.partitions: list[Partition] = []
        self.fleet: Fleet | None = None

    def create(self, parent: Any) -> PartitionsStep:
        return self

    def start(self, parent: Any) -> None:
        runtime = current_worker(parent.app)
        if runtime is None or self.partitions:
            return
        # Celery's signal handlers are in place: make a first Ctrl-C exit 0, as SIGTERM does.
        compat.install_warm_sigint(parent)
        self.partitions.extend(Partition(partition) for partition in runtime.partitions)
        balanced = runtime.balanced
        if runtime.settings.redis is not None:
            # pinned members beat too, so the balanced ones leave their partitions be
            self.fleet = Fleet(runtime, self.partitions, balanced=balanced)
        if not balanced or self.fleet is None:
            for unit in self.partitions:
                unit.start()
        if self.fleet is not None:
            self.fleet.start()
        logger.info("%s: %d partition(s) in this process: %s", parent.hostname,
                    len(self.partitions), runtime.label)

    def partition(self, pool: str, index: int) -> Partition:
        """Partition ``index`` of ``pool`` of this process, as a unit."""
        return unit_of(self.partitions, pool, index)

    def close(self, parent: Any) -> None:
        """Warm stop: no further message anywhere; wait for the running ones."""
        runtime = current_worker(parent.app)
        if runtime is None:
            return
        if not runtime.stop_event.is_set():
            logger.info("%s: warm stop: every partition finishes its task and starts no other",
                        parent.hostname)
        runtime.stop_event.set()
        wake(self.partitions)  # every idle fetch at once, not one stop after the other
        if self.fleet is not None:
            self.fleet.stop()  # leave the pools first: the others take over as leases free
        for unit in self.partitions:
            while unit.running:
                if compat.terminate_requested():
                    # Cold shutdown: running tasks are cut short (recovered at the head), so
                    # the exit status must not say clean (Celery 5.4 would keep the warm 0).
                    if not parent.exitcode:
                        parent.exitcode = EXIT_UNCLEAN
                    return
                unit.stop(timeout=0.2)

    def stop(self, parent: Any) -> None:
        self.close(parent)

    def terminate(self, parent: Any) -> None:
        runtime = current_worker(parent.app)
        if runtime is not None:
            runtime.stop_event.set()

    def shutdown(self, parent: Any) -> None:
        self.terminate(parent)
