"""The consumer bootstep that runs the gate chain before Celery sees a message.

Celery dispatches each task message to ``consumer.strategies[task name]``
(``celery/worker/consumer/consumer.py`` ``create_task_handler``); the ``Tasks`` step fills
that dict on every (re)start. This step, required to start after ``Tasks`` and before the
event loop, wraps each strategy: the runtime's gates are asked first; then a message with a
future ETA holds the partition until its time (Celery would keep it in memory and run later
messages first, celery#3640); then the original strategy runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from celery import bootsteps

from .. import compat
from ..exits import EXIT_KEEP_MESSAGE, exit_now
from ..message import PartitionMessage
from .runtime import PartitionRuntime, current_runtime
from .transport import enable_reliable_fetch

__all__ = ["GateStep", "gated_strategy", "gate_name"]

logger = logging.getLogger("celery_partitioning.worker")

#: Attribute marking a strategy this module already wrapped.
_WRAPPED: Final = "__partition_gated__"


def _eta_of(headers: dict[str, Any]) -> float | None:
    raw = headers.get("eta")
    if not raw or not isinstance(raw, str):
        return None
    try:
        eta = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    return eta.timestamp()


def hold_until_eta(runtime: PartitionRuntime, msg: PartitionMessage) -> bool:
    """Wait for the message's ETA in place; False if the worker is stopping meanwhile.

    The message stays unacked while we wait; when the worker stops first it goes back
    to the head of the queue (Redis: kombu restores it on close; RabbitMQ: requeue).
    """
    eta = _eta_of(msg.headers)
    if eta is None:
        return True
    delay = eta - time.time()
    if delay > 0:
        logger.info("%s task %s has an ETA in %.1fs: the partition waits for it (FIFO)",
                    runtime.label, msg.task_id, delay)
        while (left := eta - time.time()) > 0:
            if compat.stop_requested():
                return False
            time.sleep(min(left, 0.5))
    # Run it now, in order: Celery must not schedule it aside.
    msg.headers["eta"] = None
    return True


def gated_strategy(runtime: PartitionRuntime, name: str,
                   strategy: Callable[..., Any]) -> Callable[..., Any]:
    """``strategy`` behind the runtime's gates and the ETA hold."""

    def gated(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        if runtime.consumer_qos is None:
            runtime.consumer_qos = getattr(getattr(message, "channel", None), "qos", None)
        msg = PartitionMessage(message, name)
        if compat.stop_requested():
            # Warm shutdown stops after the running task. kombu may already have handed us
            # the next message in the same cycle: leave it unacked, so it goes back to the
            # head of the queue for whoever takes the partition next (as an ETA hold does).
            logger.info("%s stopping: task %s stays queued for the next worker",
                        runtime.label, msg.task_id)
            return None
        for gate in list(runtime.gates):
            try:
                taken = gate(msg)
            except Exception:  # noqa: BLE001 - exit_now logs the traceback
                exit_now(EXIT_KEEP_MESSAGE, "%s gate %s failed on message %s (task %s); stopping "
                         "this worker without acking so the message is not run out of order",
                         runtime.label, gate_name(gate), msg.task_id, name, exc_info=True)
            if taken:
                return None
        if not hold_until_eta(runtime, msg):
            return None
        return strategy(message, body, ack, reject, callbacks, **kwargs)

    setattr(gated, _WRAPPED, True)
    gated.__wrapped__ = strategy  # type: ignore[attr-defined]
    return gated


class GateStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: wrap every task strategy with the partition gates."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "partition gates"

    def start(self, c: Any) -> None:
        runtime = current_runtime(c.app)
        if runtime is None:
            return
        strategies = compat.consumer_strategies(c)
        for name, strategy in list(strategies.items()):
            if not getattr(strategy, _WRAPPED, False):
                strategies[name] = gated_strategy(runtime, name, strategy)
        # Redis: no window where a popped message is in neither the queue nor unacked.
        if runtime.broker is not None and c.task_consumer is not None:
            assert runtime.on_malformed is not None, "failure handling sets it at start"
            enable_reliable_fetch(c.task_consumer.channel, runtime.queue,
                                  runtime.keys.in_transit(runtime.queue), runtime.broker.client,
                                  on_malformed=runtime.on_malformed,
                                  register=runtime.fetch_register)
        # Logging is set up after worker_init, so the start-up summary is said here.
        logger.info("%s consuming %s via %s (%s; %d message(s) recovered to the head; gates: %s)",
                    runtime.label, runtime.queue, runtime.transport,
                    "lease held" if runtime.lease is not None else "no lease",
                    runtime.recovered, ", ".join(gate_name(g) for g in runtime.gates))


def gate_name(gate: object) -> str:
    """How log lines name a gate: its ``__name__`` (a function's, or a gate object's own)."""
    name = getattr(gate, "__name__", None)
    return str(name) if isinstance(name, str) and name else type(gate).__name__
