"""Running one received message as Celery's own consumer would, in the partition's thread.

The task's *strategy* (``Task.start_strategy``: request, ``Received task`` log, signals,
events, revoke checks) hands the request to a stand-in consumer whose pool runs the traced task
in the calling thread, as Celery's solo pool does. Signals, result backends, ``bind=True``
request fields, ``acks_late``, ``inspect active`` and task events behave as on a plain worker,
one message at a time per partition.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.app import trace
from celery.concurrency.base import BasePool, apply_target

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Executor", "InlinePool"]

logger = logging.getLogger("celery_partitioning.worker")


class InlinePool(BasePool):  # type: ignore[misc]
    """A pool that runs each task in the calling thread (a partition thread)."""

    body_can_be_buffer = True

    def __init__(self) -> None:
        super().__init__(limit=1)
        self.on_apply = apply_target


class _ConsumerView:
    """What a Celery strategy reads of its consumer, for one partition worker process."""

    disable_rate_limits = True

    def __init__(self, app: Celery, worker: Any, pool: InlinePool) -> None:
        self.app = app
        self.pool = pool
        self.hostname = worker.hostname
        consumer = getattr(worker, "consumer", None)
        self.connection_errors = tuple(getattr(consumer, "connection_errors", ()) or ())
        self.event_dispatcher = getattr(consumer, "event_dispatcher", None)
        self.controller = worker
        self.timer = worker.timer
        self.task_buckets: dict[str, Any] = {}

    def on_task_request(self, request: Any) -> None:
        request.execute_using_pool(self.pool)

    def apply_eta_task(self, request: Any) -> None:  # pragma: no cover - ETAs are held before
        raise RuntimeError("a partition worker holds an ETA message before its strategy runs")

    _limit_task = _limit_post_eta = apply_eta_task


class Executor:
    """Runs messages through Celery's strategies, inline (one instance per process)."""

    def __init__(self, app: Celery, worker: Any) -> None:
        self.app = app
        self.worker = worker
        self.pool = InlinePool()
        self._lock = threading.Lock()
        self._strategies: dict[tuple[str, int], Any] = {}

    def _strategy(self, name: str) -> Any:
        consumer = getattr(self.worker, "consumer", None)
        dispatcher = getattr(consumer, "event_dispatcher", None)
        cache_key = (name, id(dispatcher))
        strategy = self._strategies.get(cache_key)
        if strategy is None:
            with self._lock:
                strategy = self._strategies.get(cache_key)
                if strategy is None:
                    task = self.app.tasks[name]
                    # Built here: a tracer built before an SDK patched build_tracer bypasses it.
                    task.__trace__ = trace.build_tracer(name, task, self.app.loader,
                                                        self.worker.hostname, app=self.app)
                    view = _ConsumerView(self.app, self.worker, self.pool)
                    strategy = task.start_strategy(self.app, view)
                    self._strategies[cache_key] = strategy
        return strategy

    def run(self, name: str, message: Any, done: Callable[[], None]) -> None:
        """Run ``message`` of task ``name`` to its ack; ``done()`` runs just before the ack
        (or a reject without requeue), so a crash in between runs the message again. Raises
        what Celery would treat as an invalid message, and a ``WorkerShutdown``."""
        def ack(log: Any, errors: Any, multiple: bool = False) -> None:
            done()
            message.ack_log_error(log, errors, multiple)

        def reject(log: Any, errors: Any, requeue: bool = False) -> None:
            if not requeue:
                done()
            message.reject_log_error(log, errors, requeue)

        self._strategy(name)(message, None, ack, reject, [])
