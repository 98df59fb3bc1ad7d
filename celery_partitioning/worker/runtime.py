"""The partition runtime: what one partition worker process knows, and the hook points on it.

A partition worker is a plain ``celery worker`` process (``-P solo -c 1 -Q <queue>``) that
the supervisor (``celery partitioning worker``) starts with the environment variable
``PARTITION_ENV`` set to ``"pool:index"``. ``install(app)`` wires signal handlers that, in
such a process only, build a :class:`PartitionRuntime` and hang it off the app.

Hook points for other parts of the package (failure handling builds on these):

``current_runtime(app) -> PartitionRuntime | None``
    The runtime of this process, or None outside a partition worker. It exists from the
    ``worker_init`` signal on (before the lease is taken).

``PartitionRuntime`` attributes
    ``app``, ``settings`` (PartitioningSettings), ``pool`` (str), ``index`` (int),
    ``queue`` (the partition queue name), ``redis`` (a redis-py client for
    ``settings.redis_url``, or None when no Redis store is configured), ``keys``
    (``RedisKeys`` under the app's namespace), ``hostname`` (the Celery node name).

``PartitionRuntime.gates: list[Gate]`` where ``Gate = Callable[[PartitionMessage], bool]``
    Called, in list order, for every message the partition worker receives, BEFORE Celery
    builds a request for it. A gate returns True when it has taken the message (re-published
    it, set it aside, acked it): the message is then not run and later gates are not asked.
    The misroute guard is the first gate and the parking gate the second; append yours
    (``runtime.gates.append(gate)``): on a Redis broker the parking gate is decided as
    the message is received (``fetch_register``), so no gate may come between the two.
    A gate that raises stops the worker process at once (``os._exit``), without acking:
    the message goes back to the head of the queue by crash recovery, order intact.
    After the gates, a message with a future ETA blocks the partition until its time
    (FIFO is kept; Celery would otherwise hold it aside and run later messages first).

``PartitionMessage`` (``celery_partitioning.message``, the codec)
    ``headers``, ``body`` (raw bytes, still serialized), ``properties``, ``delivery_info``,
    ``task_name``, ``task_id``, ``partition_key`` / ``partition_pool`` / ``partition_index``
    (from the headers; None on messages that are not partitioned), ``message`` (the raw
    kombu message), ``payload()`` and ``ack()``. A gate has a ``__name__`` people can read:
    the start-up line lists the gates by it.

``PartitionRuntime.fetch_register``
    On a Redis broker, a ``store.broker.Register`` that replaces the transaction recording a
    fetched message as unacked (it must do the same, atomically, and may do more in it).

``PartitionRuntime.on_started: list[Callable[[PartitionRuntime], None]]``
    Run once, in order, after the lease is held and crash recovery is done, before the
    worker consumes its first message (still inside ``worker_init``: every task is
    registered). Use it to patch partitioned tasks (in-place retry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..config import PartitioningSettings
from ..errors import PartitionConfigError
from ..message import PartitionMessage
from ..store.keys import RedisKeys

if TYPE_CHECKING:
    from celery import Celery

    from ..store.broker import BrokerRedis, Register
    from ..store.lease import Lease
    from .failures import DeadLetters

__all__ = [
    "PARTITION_ENV",
    "LEASE_TOKEN_ENV",
    "LEASE_TAKEOVER_ENV",
    "SUPERVISOR_PID_ENV",
    "Gate",
    "PartitionRuntime",
    "current_runtime",
    "attach_runtime",
    "parse_partition",
]

#: Set by the supervisor on each child ``celery worker``: ``"pool:index"``.
PARTITION_ENV: Final = "CELERY_PARTITIONING_PARTITION"
#: Set by the supervisor: the lease token the child must use (random when unset).
LEASE_TOKEN_ENV: Final = "CELERY_PARTITIONING_LEASE_TOKEN"
#: Set by the supervisor on a restarted child: the token of its predecessor, which the
#: supervisor saw die, so the new child may take the lease over without waiting the TTL.
LEASE_TAKEOVER_ENV: Final = "CELERY_PARTITIONING_LEASE_TAKEOVER"
#: Set by the supervisor: its pid; a child whose parent changes (supervisor gone) stops
#: warmly (``orphan.py``).
SUPERVISOR_PID_ENV: Final = "CELERY_PARTITIONING_SUPERVISOR_PID"

#: Attribute of the Celery app that holds the PartitionRuntime of this process.
RUNTIME_ATTRIBUTE: Final = "_celery_partitioning_runtime"


#: A gate: True when it has taken the message, which must then not run.
Gate = Callable[[PartitionMessage], bool]


@dataclass(eq=False)
class PartitionRuntime:
    """The state of one partition worker process."""

    app: Celery
    settings: PartitioningSettings
    pool: str
    index: int
    #: The partition queue name.
    queue: str
    #: A redis-py client for ``settings.redis_url`` (leases, dead letters), or None.
    redis: Any
    keys: RedisKeys
    #: The Celery node name of this worker.
    hostname: str = ""
    #: Called for every received message before it runs; see the module docstring.
    gates: list[Gate] = field(default_factory=list)
    #: Called after the lease is held and recovery done, before consuming.
    on_started: list[Callable[[PartitionRuntime], None]] = field(default_factory=list)
    #: The exclusive-consumer lease (Redis broker with a Redis store), else None.
    lease: Lease | None = None
    #: kombu's transport driver type: ``"redis"``, ``"amqp"``, ...
    transport: str = ""
    #: The kombu QoS of the consuming channel, once a message arrived (for the heartbeat).
    consumer_qos: Any = None
    #: Messages put back at the head of the queue by crash recovery at start.
    recovered: int = 0
    #: kombu's Redis names and a plain client to the broker (Redis broker only).
    broker: BrokerRedis | None = None
    #: Replaces the transaction that records a fetched message as unacked (Redis broker):
    #: the parking gate sets it to decide in that same script.
    fetch_register: Register | None = None
    #: Stores a message that cannot run at all (dead letter, reason MALFORMED); set by the
    #: failure handling. Called with the raw bytes (or payload text) and why.
    on_malformed: Callable[[bytes | str, str], None] | None = None
    #: Writes dead letters (None without a Redis store); the consumer uses it for malformed
    #: messages it received.
    dead_letters: DeadLetters | None = None

    @property
    def label(self) -> str:
        """``pool.index``: how log lines name this partition."""
        return f"{self.pool}.{self.index}"


def parse_partition(value: str, settings: PartitioningSettings) -> tuple[str, int]:
    """Parse ``"pool:index"`` (``PARTITION_ENV``) against the settings."""
    pool, sep, raw = value.rpartition(":")
    if not sep or not pool or not raw.isdigit():
        raise PartitionConfigError(
            f"{PARTITION_ENV}={value!r} is not 'pool:index' (for example 'entity:3')"
        )
    index = int(raw)
    count = settings.partitions(pool)
    if index >= count:
        raise PartitionConfigError(
            f"{PARTITION_ENV}={value!r}: pool {pool!r} has partitions 0-{count - 1} "
            "(setting partitioning_pools)"
        )
    return pool, index


def current_runtime(app: Celery) -> PartitionRuntime | None:
    """The PartitionRuntime of this process, or None when it is not a partition worker."""
    runtime = vars(app).get(RUNTIME_ATTRIBUTE)
    return runtime if isinstance(runtime, PartitionRuntime) else None


def attach_runtime(app: Celery, runtime: PartitionRuntime) -> None:
    """Hang ``runtime`` off ``app`` (one per process)."""
    setattr(app, RUNTIME_ATTRIBUTE, runtime)
