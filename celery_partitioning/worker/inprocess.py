"""Partition workers inside the calling process (a test): the real partition threads, no
``celery worker`` process around them.

:class:`InProcessWorker` builds the runtime a worker process builds (``hooks.build_runtime``)
and starts each partition as a ``lifecycle.Partition`` unit; :meth:`InProcessWorker.partition`
gives one to stop and start again. Tasks run through Celery's strategies as in a worker
process; the Celery node is a stand-in (no remote control, heartbeats or task events).

Where a worker process would end itself (a failed gate, an unstorable dead letter, a lost
lease) the partition stops instead, its message unacked, and :meth:`InProcessWorker.close`
raises :class:`InProcessWorkerError`. ``close`` is a warm stop that gives everything back
(threads, leases, task patches, clients), so a later start begins afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from kombu.asynchronous.timer import Timer

from ..errors import PartitionConfigError, PartitioningError
from ..exits import ThreadExit, raise_instead_of_exit
from ..state import partitioning_of
from ..validation import assert_valid_partition_keys
from .hooks import build_runtime
from .lifecycle import Partition, unit_of, wake
from .partition import PartitionThread
from .runtime import PartitionRuntime, WorkerRuntime, attach_worker, current_worker
from .task_patch import own_attributes, restore_attributes

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["InProcessWorker", "InProcessWorkerError", "hosted_partitions"]

logger = logging.getLogger("celery_partitioning.worker")

#: What building the runtime sets on each task instance, given back at close.
_TASK_ATTRIBUTES: Final = ("acks_late", "__trace__")
#: Seconds ``start`` waits for every partition to consume (a lease held elsewhere...).
START_TIMEOUT: Final = 15.0
#: Seconds ``close`` waits for running tasks to finish.
STOP_TIMEOUT: Final = 30.0


class InProcessWorkerError(PartitioningError):
    """An in-process partition worker could not start, or a partition of it stopped early."""


class _Node:
    """What the executor and Celery's strategies read of the Celery node they run in."""

    consumer = None  # no event dispatcher: no task events

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.timer = Timer()

    @property
    def state(self) -> Any:
        from celery.worker import state

        return state


def hosted_partitions(app: Celery, pools: str | Iterable[str] | None) -> list[tuple[str, int]]:
    """Every partition of ``pools`` (a name, names, or None: every pool of the app)."""
    settings = partitioning_of(app).settings
    names = list(settings.pools) if pools is None else [pools] if isinstance(pools, str) else list(pools)
    unknown = [name for name in names if name not in settings.pools]
    if unknown or not names:
        raise PartitionConfigError(f"no pool {', '.join(map(repr, unknown)) or '(none given)'} "
                                   f"in partitioning_pools (pools: {', '.join(settings.pools)})")
    return [(pool, index) for pool in names for index in range(settings.partitions(pool))]


class _Thread(PartitionThread):
    """A partition thread whose fatal errors stop it instead of ending the process."""

    def __init__(self, owner: InProcessWorker, runtime: PartitionRuntime) -> None:
        super().__init__(runtime)
        self.owner = owner
        #: It stopped where a worker process would have ended (``owner.failures`` says why).
        self.failed = False

    def run(self) -> None:
        raise_instead_of_exit(self.owner.failed)
        # Celery's tracer finds the task through the (thread-local) current app.
        self.runtime.app.set_current()
        with contextlib.suppress(ThreadExit):  # recorded by owner.failed; message kept
            super().run()


class InProcessWorker:
    """The partition workers of ``app`` (``pools``: None for all) as threads of this process."""

    def __init__(self, app: Celery, pools: str | Iterable[str] | None = None, *,
                 start_timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.app = app
        self.hosted = hosted_partitions(app, pools)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.hostname = f"partitions-{os.getpid()}-{threading.get_ident()}@{socket.gethostname()}"
        self.runtime: WorkerRuntime | None = None
        self.partitions: list[Partition] = []
        self.failures: list[str] = []
        self._before: dict[Any, dict[str, Any]] = {}

    # -- what went wrong in a partition ------------------------------------------------------
    def failed(self, error: ThreadExit | str) -> None:
        """A partition stopped where a worker process would have ended: stop them all."""
        thread = threading.current_thread()
        if isinstance(thread, _Thread):
            if thread.failed:
                return  # the same failure, unwinding through the thread's last resort
            thread.failed = True
        self.failures.append(error.reason if isinstance(error, ThreadExit) else error)
        if self.runtime is not None:
            self.runtime.stop_event.set()

    def _fence(self, reason: str) -> None:
        logger.critical("celery-partitioning: %s; stopping the in-process partition worker",
                        reason)
        self.failed(reason)

    # -- start -------------------------------------------------------------------------------
    def start(self) -> InProcessWorker:
        """Build the runtime, start a thread per partition, return once every one consumes."""
        app = self.app
        if current_worker(app) is not None:
            raise InProcessWorkerError(f"app {app.main!r} already runs partition workers in this "
                                       "process; stop them first")
        assert_valid_partition_keys(app)
        self._before = {task: own_attributes(task, _TASK_ATTRIBUTES) for task in app.tasks.values()}
        runtime = build_runtime(app, _Node(self.hostname), self.hosted, fence=self._fence)
        self.runtime = runtime
        attach_worker(app, runtime)
        try:
            for partition in runtime.partitions:
                unit = Partition(partition, thread=lambda rt: _Thread(self, rt))
                self.partitions.append(unit)
                unit.start()
            self._wait_consuming()
        except BaseException:
            self.close(raise_failures=False)
            raise
        logger.info("%s: %d partition(s) consuming in this process: %s", self.hostname,
                    len(self.partitions), runtime.label)
        return self

    @property
    def threads(self) -> list[PartitionThread]:
        """The current thread of each partition."""
        return [unit.thread for unit in self.partitions if unit.thread is not None]

    def partition(self, pool: str, index: int) -> Partition:
        """Partition ``index`` of ``pool`` as a unit to stop and start again."""
        return unit_of(self.partitions, pool, index)

    def _wait_consuming(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        for thread in self.threads:
            while not thread.consuming.wait(0.05):
                if not thread.is_alive() or self.failures:
                    raise InProcessWorkerError(
                        f"partition {thread.runtime.label} stopped before it consumed: "
                        f"{'; '.join(self.failures) or 'see the log'}")
                if time.monotonic() > deadline:
                    raise InProcessWorkerError(
                        f"partition {thread.runtime.label} does not consume after "
                        f"{self.start_timeout:.0f}s: {_why_waiting(thread)}")

    # -- stop --------------------------------------------------------------------------------
    def close(self, *, raise_failures: bool = True) -> None:
        """Warm stop: no further message; running tasks finish; everything given back."""
        runtime = self.runtime
        if runtime is None:
            return
        runtime.stop_event.set()
        wake(self.partitions)  # every idle fetch at once, not one stop after the other
        deadline = time.monotonic() + self.stop_timeout
        running = [unit.label for unit in self.partitions
                   if not unit.stop(max(0.0, deadline - time.monotonic()))]
        if running:
            raise InProcessWorkerError(
                f"partition(s) {', '.join(running)} still run a task {self.stop_timeout:.0f}s "
                "after the warm stop; their threads are left running")
        self.partitions.clear()
        self.runtime = None
        if runtime.retry is not None:
            runtime.retry.unpatch_all()
        for task, before in self._before.items():
            restore_attributes(task, _TASK_ATTRIBUTES, before)
        attach_worker(self.app, None)
        _close_clients(runtime)
        if self.failures and raise_failures:
            raise InProcessWorkerError("; ".join(self.failures))

    def __enter__(self) -> InProcessWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close(raise_failures=exc[0] is None)


def _why_waiting(thread: PartitionThread) -> str:
    lease = thread.runtime.lease
    if lease is None:
        return "see the log"
    try:
        holder = lease.holder()
    except Exception as exc:  # noqa: BLE001 - only for the message
        return f"its lease store does not answer ({exc})"
    if holder is None:
        return "its lease is free; see the log"
    return (f"its lease is held by {holder.describe()} (another worker on this Redis: stop it, "
            "or use a database of your own)")


def _close_clients(runtime: WorkerRuntime) -> None:
    clients: list[Any] = []
    for partition in runtime.partitions:
        clients += [partition.redis, partition.broker.client if partition.broker else None,
                    partition.lease.client if partition.lease else None]
    seen: set[int] = set()
    for client in clients:
        if client is not None and id(client) not in seen:
            seen.add(id(client))
            try:
                client.close()
                client.connection_pool.disconnect()
            except Exception:
                logger.debug("closing a Redis client failed", exc_info=True)
