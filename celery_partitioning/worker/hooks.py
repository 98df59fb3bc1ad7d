"""Wiring a partition worker process: Celery signals → runtime, lease, recovery, gates.

``install(app)`` imports this module only in a ``celery worker`` process, at ``celeryd_init``
(:func:`configure_worker`). Any other worker of the app: a ``-Q`` naming a partition queue
is refused (``ALLOW_PLAIN_CONSUMER_ENV=1`` overrides it).

In a process started with ``PARTITION_ENV`` (the supervisor's children) only:

1. ``celeryd_init``: check the Celery/kombu internals this package relies on
   (``compat.py``); start watching the supervisor (``orphan.py``: if it dies, keep the
   output flowing and stop warmly); check ``-Q`` is the partition queue, make it the
   router's kombu Queue (RabbitMQ declares it with ``x-single-active-consumer``), force
   ``acks_late``, ``reject_on_worker_lost``, prefetch 1 and rate limits off; select the
   loss-free Redis transport (``transport.py``), the consumer that dead-letters malformed
   messages (``consumer.py``) and the gate step (``gate.py``).
2. ``worker_init`` (after the registry check): build the PartitionRuntime; on a Redis
   broker take the lease (a standby waits here, before consuming anything) and start its
   heartbeat; put the partition's unacked messages back at the head of its queue; run the
   ``on_started`` hooks.
3. ``worker_shutdown``: release the lease (kombu has restored unacked messages by then).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Final

from celery import signals

from .. import compat
from ..config import PartitioningSettings
from ..errors import PartitioningError
from ..state import partitioning_of, redis_client, redis_keys
from ..store.broker import BrokerRedis, broker_redis, restore_unacked_to_head
from ..store.lease import Lease
from .failures import install_failure_handling
from .gate import GateStep
from .guard import misroute_guard
from .orphan import start_supervisor_watch, supervisor_gone
from .runtime import (
    LEASE_TAKEOVER_ENV,
    LEASE_TOKEN_ENV,
    PARTITION_ENV,
    PartitionRuntime,
    attach_runtime,
    current_runtime,
    parse_partition,
)
from .transport import TRANSPORTS

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["configure_worker", "FORCED_WORKER_SETTINGS", "ALLOW_PLAIN_CONSUMER_ENV"]

logger = logging.getLogger("celery_partitioning.worker")

#: Set to ``1`` to let a plain ``celery worker`` consume partition queues (no ordering guarantee).
ALLOW_PLAIN_CONSUMER_ENV: Final = "CELERY_PARTITIONING_ALLOW_PLAIN_CONSUMER"
#: The Celery consumer class of a partition worker (``worker_consumer``).
PARTITION_CONSUMER: Final = "celery_partitioning.worker.consumer:PartitionConsumer"
#: Settings every partition worker runs with, whatever the app says.
FORCED_WORKER_SETTINGS: Final = {
    "worker_prefetch_multiplier": 1,
    "worker_concurrency": 1,
    "worker_disable_rate_limits": True,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
}


def _partition_env() -> str | None:
    return os.environ.get(PARTITION_ENV) or None


def configure_worker(app: Celery, options: dict[str, Any]) -> None:
    """``celeryd_init`` of any ``celery worker`` of an installed app (see the module docstring)."""
    state = partitioning_of(app)
    wanted = options.get("queues")
    names = [q.strip() for q in wanted.split(",")] if isinstance(wanted, str) else list(wanted or [])
    value = _partition_env()
    if value is None:
        _refuse_partition_queues(state.settings, names)
        return
    scheme = str(app.conf.broker_url or "").split("://", 1)[0].split("+")[-1]
    try:
        pool, index = parse_partition(value, state.settings)
        compat.check_worker_internals(redis_broker=scheme in TRANSPORTS)
    except PartitioningError as exc:
        raise SystemExit(f"celery-partitioning: {exc}") from None
    start_supervisor_watch(f"{pool}.{index}", _stop_warmly)
    queue = state.router.queue(pool, index)
    if names != [queue.name]:
        raise SystemExit(f"celery-partitioning: a worker for partition {pool}.{index} must "
                         f"consume exactly its queue: -Q {queue.name} (got {names or 'none'}); "
                         "start it with `celery partitioning worker`")
    concurrency = options.get("concurrency")
    if concurrency not in (None, 1):
        raise SystemExit(f"celery-partitioning: partition worker {pool}.{index} must run "
                         f"with concurrency 1 (-c 1), got {concurrency}")
    app.amqp.queues.add(queue)
    app.conf.update(FORCED_WORKER_SETTINGS)
    if scheme in TRANSPORTS and not app.conf.broker_transport:
        app.conf.broker_transport = TRANSPORTS[scheme]
    app.conf.worker_consumer = PARTITION_CONSUMER
    app.steps["consumer"].add(GateStep)
    _connect_worker_signals(app)


def _refuse_partition_queues(settings: PartitioningSettings, names: list[str]) -> None:
    """A plain ``celery worker -Q <partition queue>`` stops before it consumes anything.

    It would hold no lease, prefetch several messages, run them concurrently and send retries
    to the back of the queue: exactly the reordering partitioning prevents. On RabbitMQ the
    single-active-consumer queue would still make it a rival of the real partition worker.
    """
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


def _force_task_options(app: Celery) -> None:
    for task in app.tasks.values():
        task.acks_late = True
        task.reject_on_worker_lost = True


def _stop_warmly() -> None:
    """What Celery's SIGTERM handler does, minus printing: the consume loop stops after the
    current task and the lease is released. Also works before that handler is installed."""
    compat.request_warm_stop()


def _take_lease(runtime: PartitionRuntime, lease: Lease) -> None:
    """Block as a standby until the lease is ours; exit 0 if told to stop first."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        def should_stop() -> bool:
            return stop.is_set() or supervisor_gone()

        if not lease.try_acquire():
            holder = lease.holder()
            logger.warning("%s standby: partition %s is held by %s; waiting (takes over at most "
                           "%.0fs after the holder stops)", runtime.label, runtime.queue,
                           holder.describe() if holder else "another worker", lease.ttl)
            if not lease.acquire(should_stop, runtime.label):
                logger.warning("%s stopped while standby", runtime.label)
                raise SystemExit(0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    lease.start_heartbeat()


def _start_runtime(app: Celery, worker: Any) -> None:
    # Celery logs and swallows exceptions from signal receivers; a partition worker that
    # could not take its lease or recover its queue must not consume: exit instead.
    try:
        _start_runtime_or_raise(app, worker)
    except PartitioningError as exc:
        logger.critical("%s", exc)
        raise SystemExit(f"celery-partitioning: {exc}") from None
    except Exception as exc:
        logger.critical("celery-partitioning: partition worker start-up failed", exc_info=True)
        raise SystemExit(f"celery-partitioning: partition worker start-up failed: {exc!r}") from None


def _start_runtime_or_raise(app: Celery, worker: Any) -> None:
    value = _partition_env()
    if value is None or current_runtime(app) is not None:
        return
    state = partitioning_of(app)
    settings = state.settings
    pool, index = parse_partition(value, settings)
    with app.connection_for_read() as conn:
        transport = str(conn.transport.driver_type)
    runtime = PartitionRuntime(
        app=app, settings=settings, pool=pool, index=index,
        queue=settings.queue_name(pool, index),
        redis=redis_client(settings.redis_url) if settings.redis_url is not None else None,
        keys=redis_keys(app), hostname=str(worker.hostname), transport=transport,
    )
    # The event loop (kombu Hub) defers late acks to its next turn; on RabbitMQ with
    # prefetch 1 that stalled a solo worker for whole timer periods (seen: 10 s between
    # tasks). The plain consume loop acks at once. The Hub step is built after worker_init.
    worker.use_eventloop = False
    runtime.gates.append(misroute_guard(runtime))
    runtime.on_started.append(install_failure_handling)  # parking gate, in-place retry
    attach_runtime(app, runtime)
    _force_task_options(app)

    broker: BrokerRedis | None = broker_redis(app) if transport == "redis" else None
    if broker is not None and settings.redis_url is not None:
        ttl = settings.lease_ttl
        lease_client = redis_client(settings.redis_url, timeout=max(0.2, ttl / 4))
        lease = Lease(lease_client, runtime.keys.lease(runtime.queue), ttl,
                      node=runtime.hostname, token=os.environ.get(LEASE_TOKEN_ENV),
                      takeover=os.environ.get(LEASE_TAKEOVER_ENV))
        runtime.lease = lease
        _take_lease(runtime, lease)

        def refresh_held() -> None:
            tags = compat.held_delivery_tags(runtime.consumer_qos)
            if tags:
                broker.refresh(tags)

        lease.on_beat.append(refresh_held)
    if broker is not None:
        runtime.broker = broker
        runtime.recovered = restore_unacked_to_head(broker, runtime.queue,
                                                    runtime.keys.in_transit(runtime.queue))
        if runtime.recovered:
            logger.warning("%s crash recovery: %d unacked message(s) put back at the head of %s",
                           runtime.label, runtime.recovered, runtime.queue)
    for hook in list(runtime.on_started):
        try:
            hook(runtime)
        except Exception:
            logger.critical("%s on_started hook %r failed", runtime.label, hook, exc_info=True)
            raise SystemExit(f"celery-partitioning: start-up hook {hook!r} failed") from None


def _stop_runtime(app: Celery) -> None:
    runtime = current_runtime(app)
    if runtime is not None and runtime.lease is not None:
        runtime.lease.release()


def _connect_worker_signals(app: Celery) -> None:
    """The runtime starts at ``worker_init`` (a standby waits there) and stops at shutdown."""

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            _start_runtime(app, sender)

    def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            _stop_runtime(app)

    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
