"""What a partition worker process hosts: a :class:`WorkerRuntime` with one
:class:`PartitionRuntime` per partition, each consumed by a thread of its own
(``partition.py``), and the environment the supervisor passes its children.

``current_runtime(app)`` is the partition the calling thread consumes (inside a task: the
task's), or None outside a partition thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .. import compat
from ..config import PartitioningSettings
from ..errors import PartitionConfigError
from ..store.keys import RedisKeys
from ..store.requeue import HEAD_PUSH, Requeue
from .progress import Progress
from .stage import Pipeline, Place

if TYPE_CHECKING:
    from celery import Celery

    from ..store.broker import BrokerRedis
    from ..store.lease import Lease, LeaseRenewer
    from .failures import DeadLetters

__all__ = ["PARTITIONS_ENV", "BALANCE_ENV", "LEASE_TOKEN_ENV", "LEASE_TAKEOVER_ENV",
           "SUPERVISOR_PID_ENV", "PROCESSES_ENV", "EVENTS_ENV", "RELAY_ENV", "PartitionRuntime",
           "WorkerRuntime", "current_runtime", "current_worker", "attach_worker", "bind_thread",
           "parse_partitions"]

#: Set by the supervisor on each child ``celery worker``: ``"pool:index,pool:index,..."``.
PARTITIONS_ENV: Final = "CELERY_PARTITIONING_PARTITIONS"
#: ``1``: the process holds only its balanced share of the partitions it hosts; unset: all.
BALANCE_ENV: Final = "CELERY_PARTITIONING_BALANCE"
#: Set by the supervisor: the lease token the child uses for all its partitions.
LEASE_TOKEN_ENV: Final = "CELERY_PARTITIONING_LEASE_TOKEN"
#: Set on a restarted child: its dead predecessor's token, whose leases it takes over at once.
LEASE_TAKEOVER_ENV: Final = "CELERY_PARTITIONING_LEASE_TAKEOVER"
#: Set by the supervisor: its pid (``orphan.py``).
SUPERVISOR_PID_ENV: Final = "CELERY_PARTITIONING_SUPERVISOR_PID"
#: Set by the supervisor: how many processes it runs (they wait for each other at start).
PROCESSES_ENV: Final = "CELERY_PARTITIONING_PROCESSES"
#: ``0`` when the supervisor was told not to send task events (``--without-events``).
EVENTS_ENV: Final = "CELERY_PARTITIONING_EVENTS"
#: ``1`` on the process that runs the outbox relay (``outbox_relay.py``).
RELAY_ENV: Final = "CELERY_PARTITIONING_OUTBOX_RELAY"

#: Attribute of the Celery app that holds the WorkerRuntime of this process.
WORKER_ATTRIBUTE: Final = "_celery_partitioning_worker"

_thread = threading.local()


@dataclass(eq=False)
class PartitionRuntime:
    """The state of one partition of a partition worker process."""

    app: Celery
    settings: PartitioningSettings
    pool: str
    index: int
    #: The partition queue name.
    queue: str
    #: A redis-py client for the store (leases, dead letters), or None.
    redis: Any
    keys: RedisKeys
    #: The Celery node name of this worker process.
    hostname: str = ""
    #: kombu's transport driver type: ``"redis"``, ``"amqp"``, ...
    transport: str = ""
    #: The ordered stages every message goes through (``pipeline.py``).
    pipeline: Pipeline = field(default_factory=Pipeline)
    #: The exclusive-consumer lease (Redis broker with a Redis store), else None.
    lease: Lease | None = None
    #: Messages put back at the head of the queue by crash recovery at start.
    recovered: int = 0
    #: kombu's Redis names and a plain client to the broker (Redis broker only).
    broker: BrokerRedis | None = None
    #: How messages set aside go back to the queue (``store/requeue.py``).
    requeue: Requeue = HEAD_PUSH
    #: The dead-letter stage (None without a Redis store).
    dead_letters: DeadLetters | None = None
    #: The process this partition runs in.
    worker: WorkerRuntime | None = None
    #: Its thread's progress: the lease heartbeat's watchdog, and what ``status`` reads.
    progress: Progress = field(default_factory=Progress)

    #: Called when a fetch was unblocked before its time-out (``store.broker.wake_fetches``).
    on_woken: list[Callable[[], None]] = field(default_factory=list)
    #: Set to stop this partition alone (``lifecycle.Partition.stop``); cleared at start.
    stop_event: threading.Event = field(default_factory=threading.Event)

    @property
    def label(self) -> str:
        """``pool.index``: how log lines name this partition."""
        return f"{self.pool}.{self.index}"

    @property
    def place(self) -> Place:
        """Where this partition is, for its stages."""
        return Place(self.app, self.settings, self.pool, self.index, self.queue, self.hostname)

    def stopping(self) -> bool:
        """This partition, or its whole process, is stopping: start no further message."""
        return self.stop_event.is_set() or (self.worker is not None and self.worker.stopping())


@dataclass(eq=False)
class WorkerRuntime:
    """The state of one partition worker process."""

    app: Celery
    settings: PartitioningSettings
    hostname: str
    transport: str
    partitions: list[PartitionRuntime] = field(default_factory=list)
    #: Set when the process stops (warm shutdown, control shutdown, supervisor gone).
    stop_event: threading.Event = field(default_factory=threading.Event)
    #: It holds a balanced share of its partitions (``BALANCE_ENV``), not all of them.
    balanced: bool = False
    #: Process-wide helpers, set at start (the in-place retry patcher, the executor).
    retry: Any = None
    executor: Any = None
    #: The partition pauses of the process's pools, polled once for all (``pausing.PausePoll``).
    pauses: Any = None
    #: Renews the leases of every partition of the process in one call per beat.
    renewer: LeaseRenewer | None = None

    def stopping(self) -> bool:
        return self.stop_event.is_set() or compat.stop_requested()

    @property
    def label(self) -> str:
        """How log lines name this process: its partitions."""
        return ",".join(p.label for p in self.partitions)


def parse_partitions(value: str, settings: PartitioningSettings) -> list[tuple[str, int]]:
    """Parse ``"pool:index,pool:index"`` (``PARTITIONS_ENV``) against the settings."""
    found: list[tuple[str, int]] = []
    for item in value.split(","):
        pool, sep, raw = item.strip().rpartition(":")
        if not sep or not pool or not raw.isdigit():
            raise PartitionConfigError(
                f"{PARTITIONS_ENV}={value!r}: {item!r} is not 'pool:index' (for example "
                "'entity:3')")
        index = int(raw)
        count = settings.partitions(pool)
        if index >= count:
            raise PartitionConfigError(
                f"{PARTITIONS_ENV}={value!r}: pool {pool!r} has partitions 0-{count - 1} "
                "(setting partitioning_pools)")
        if (pool, index) not in found:
            found.append((pool, index))
    if not found:
        raise PartitionConfigError(f"{PARTITIONS_ENV} is empty: no partition to run")
    return found


def current_runtime(app: Celery) -> PartitionRuntime | None:
    """The partition the calling thread consumes, or None outside a partition thread."""
    runtime = getattr(_thread, "runtime", None)
    return runtime if isinstance(runtime, PartitionRuntime) and runtime.app is app else None


def bind_thread(runtime: PartitionRuntime | None) -> None:
    """Make ``runtime`` the calling thread's partition (a partition thread does, at start)."""
    _thread.runtime = runtime


def current_worker(app: Celery) -> WorkerRuntime | None:
    """The WorkerRuntime of this process, or None when it is not a partition worker."""
    worker = vars(app).get(WORKER_ATTRIBUTE)
    return worker if isinstance(worker, WorkerRuntime) else None


def attach_worker(app: Celery, worker: WorkerRuntime | None) -> None:
    """Hang ``worker`` off ``app`` (one per process); None takes it off (an in-process worker
    that stopped)."""
    if worker is None:
        vars(app).pop(WORKER_ATTRIBUTE, None)
    else:
        setattr(app, WORKER_ATTRIBUTE, worker)
