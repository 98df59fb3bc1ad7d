"""Celery's remote control on the nodes of an app with partitioning: nothing it offers may give a
partition a second consumer or a second concurrent run, and ``inspect active_queues`` lists the
partition queues a node consumes.

:func:`install_guards` (at ``celeryd_init`` of every worker of an installed app) wraps a few of
Celery's process-wide handlers; each wrapper passes what is not about partitioning to Celery's
handler, so another app in the same process is served as before. A refusal is answered with
``{"error": "celery-partitioning: ..."}``, as Celery answers a command it cannot carry out:

- ``add_consumer`` / ``cancel_consumer`` of a partition queue (or routing key) on every node,
  and ``add_consumer`` of anything on a partition worker process;
- ``pool_grow``, ``pool_shrink``, ``autoscale``, ``pool_restart`` on a partition worker process;
- ``rate_limit`` and ``time_limit`` of a partitioned task on every node;
- ``revoke``/``terminate``/``revoke_by_stamped_headers`` with terminate on a partition worker
  process: flagged as revoked, but a running task is not cut short (it runs in a thread).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .. import compat
from ..config import PartitioningSettings
from ..errors import PartitionConfigError
from ..router import partition_queue
from ..state import partitioning_of
from ..tasks import spec_of
from .runtime import current_worker

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["ALLOW_PLAIN_CONSUMER_ENV", "GUARDED_COMMANDS", "install_guards",
           "partition_queues_of_node"]

logger = logging.getLogger("celery_partitioning.worker")

#: Set on a handler this module made (installing twice wraps nothing twice).
_MARK: Final = "__celery_partitioning_guard__"
#: ``1`` lets a plain ``celery worker`` consume partition queues (no ordering guarantee).
ALLOW_PLAIN_CONSUMER_ENV: Final = "CELERY_PARTITIONING_ALLOW_PLAIN_CONSUMER"

#: A Celery control handler: ``handler(state, **arguments)`` → reply.
Handler = Callable[..., Any]
#: A guard: the node's control state, Celery's own handler and the command's arguments → reply.
Guard = Callable[[Any, Handler, dict[str, Any]], Any]


def _nok(message: str) -> dict[str, str]:
    logger.warning("remote control: %s", message)
    return {"error": f"celery-partitioning: {message}"}


def _settings(app: Celery) -> PartitioningSettings | None:
    """The partitioning settings of ``app``, or None when partitioning is not installed on it."""
    try:
        return partitioning_of(app).settings
    except PartitionConfigError:
        return None


def _partition_of(settings: PartitioningSettings, name: Any) -> tuple[str, int] | None:
    """(pool, index) when ``name`` is a partition queue of a configured pool (any index: a
    resize leaves queues beyond the current size), else None."""
    if not isinstance(name, str):
        return None
    for pool in settings.pools:
        prefix = settings.queue_name(pool, 0)[:-1]
        if name.startswith(prefix) and re.fullmatch(r"\d+", name[len(prefix):]):
            return pool, int(name[len(prefix):])
    return None


def _is_partition_node(state: Any) -> bool:
    return current_worker(state.app) is not None


def _partitioned(app: Celery, task_name: Any) -> bool:
    task = app.tasks.get(task_name) if isinstance(task_name, str) else None
    return task is not None and spec_of(task) is not None


# -- the guards: (node state, Celery's handler, the command's arguments) → reply ------------

def _add_consumer(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    settings = _settings(state.app)
    queue, routing_key = arguments.get("queue"), arguments.get("routing_key")
    if settings is not None:
        taken = _partition_of(settings, queue) or _partition_of(settings, routing_key)
        if taken is not None and (_is_partition_node(state)
                                  or os.environ.get(ALLOW_PLAIN_CONSUMER_ENV) != "1"):
            pool, index = taken
            return _nok(
                f"add_consumer refused on {state.hostname}: {queue!r}"
                f"{f' (routing key {routing_key!r})' if routing_key else ''} is partition "
                f"{pool}.{index}, consumed only by `celery partitioning worker` (one task at a "
                "time, under its lease); a second consumer would run the key's messages in "
                "parallel and out of order")
        if _is_partition_node(state):
            return _nok(
                f"add_consumer refused on {state.hostname}: a partition worker process consumes "
                f"its partitions in threads and only {settings.idle_queue_name!r} itself; consume "
                f"{queue!r} with a plain `celery worker`")
    return original(state, **arguments)


def _cancel_consumer(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    settings = _settings(state.app)
    queue = arguments.get("queue")
    taken = _partition_of(settings, queue) if settings is not None else None
    if taken is not None:
        pool, index = taken
        return _nok(
            f"cancel_consumer refused on {state.hostname}: {queue!r} is partition {pool}.{index}; "
            "stop or move partitions with `celery partitioning worker` (--partitions, "
            "--processes), `celery partitioning pause --partition POOL.INDEX`, or a warm "
            "shutdown")
    return original(state, **arguments)


def _pool_command(name: str) -> Guard:
    def guard(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
        if _settings(state.app) is not None and _is_partition_node(state):
            return _nok(
                f"{name} refused on {state.hostname}: a partition worker process runs each of "
                "its partitions in a thread, one task at a time; choose processes with "
                "`celery partitioning worker --processes N` and restart that command to load new "
                "code")
        return original(state, **arguments)

    return guard


def _rate_limit(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    task_name = arguments.get("task_name")
    if (_settings(state.app) is not None and _partitioned(state.app, task_name)
            and arguments.get("rate_limit")):
        return _nok(
            f"rate_limit refused on {state.hostname}: {task_name} is partitioned; a rate limit "
            "holds messages back in worker memory and lets later ones overtake them, so "
            "partitioned tasks take none (throttle producers, or use fewer partitions)")
    return original(state, **arguments)


def _time_limit(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    task_name = arguments.get("task_name")
    if (_settings(state.app) is not None and _partitioned(state.app, task_name)
            and (arguments.get("hard") or arguments.get("soft"))):
        return _nok(
            f"time_limit refused on {state.hostname}: {task_name} is partitioned and runs in a "
            "partition thread, which cannot be interrupted; use timeouts inside the task")
    return original(state, **arguments)


def _not_terminated(state: Any, what: str, running: list[str], reply: Any) -> Any:
    if running:
        return _nok(
            f"{what} flagged as revoked on {state.hostname}, but not terminated: a partitioned "
            f"task runs in a partition thread, which cannot be cut short (running here: "
            f"{', '.join(running)}); it finishes, and a revoked message that has not started is "
            "skipped when its turn comes")
    return reply


def _running(task_ids: Any) -> list[str]:
    wanted = {task_ids} if isinstance(task_ids, str) else set(task_ids or ())
    return sorted(wanted & compat.active_task_ids())


def _guards_terminate(state: Any) -> bool:
    return _settings(state.app) is not None and _is_partition_node(state)


def _revoke(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    if arguments.get("terminate") and _guards_terminate(state):
        reply = original(state, **{**arguments, "terminate": False})
        task_id = arguments.get("task_id")
        return _not_terminated(state, f"task(s) {task_id}", _running(task_id), reply)
    return original(state, **arguments)


def _terminate(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    if _guards_terminate(state):
        task_id = arguments.get("task_id")
        reply = compat.control_handlers()["revoke"](state, task_id=task_id, terminate=False)
        return _not_terminated(state, f"task(s) {task_id}", _running(task_id), reply)
    return original(state, **arguments)


def _revoke_by_stamped_headers(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    if arguments.get("terminate") and _guards_terminate(state):
        reply = original(state, **{**arguments, "terminate": False})
        running = sorted(compat.active_task_ids())
        return _not_terminated(state, f"headers {arguments.get('headers')}", running, reply)
    return original(state, **arguments)


def _active_queues(state: Any, original: Handler, arguments: dict[str, Any]) -> Any:
    queues = original(state, **arguments)
    if _settings(state.app) is None:
        return queues
    return [*(queues or []), *partition_queues_of_node(state.app)]


def partition_queues_of_node(app: Celery) -> list[dict[str, Any]]:
    """The partition queues this process hosts, as ``inspect active_queues`` lists queues,
    with ``"partition": {"pool", "index", "partitions"}`` added."""
    worker = current_worker(app)
    if worker is None:
        return []
    exchange = app.amqp.default_exchange
    listed = []
    for partition in worker.partitions:
        queue = partition_queue(worker.settings, partition.pool, partition.index, exchange)
        entry = dict(queue.as_dict(recurse=True))
        entry["partition"] = {"pool": partition.pool, "index": partition.index,
                              "partitions": worker.settings.partitions(partition.pool)}
        listed.append(entry)
    return listed


#: Celery's control command → the guard in front of it.
GUARDED_COMMANDS: Final[dict[str, Guard]] = {
    "add_consumer": _add_consumer,
    "cancel_consumer": _cancel_consumer,
    "pool_grow": _pool_command("pool_grow"),
    "pool_shrink": _pool_command("pool_shrink"),
    "autoscale": _pool_command("autoscale"),
    "pool_restart": _pool_command("pool_restart"),
    "rate_limit": _rate_limit,
    "time_limit": _time_limit,
    "revoke": _revoke,
    "terminate": _terminate,
    "revoke_by_stamped_headers": _revoke_by_stamped_headers,
    "active_queues": _active_queues,
}


def _wrap(original: Handler, guard: Guard) -> Handler:
    @functools.wraps(original)
    def handler(state: Any, **arguments: Any) -> Any:
        return guard(state, original, arguments)

    setattr(handler, _MARK, True)
    return handler


def install_guards() -> None:
    """Put the guards in front of Celery's handlers in this process (idempotent)."""
    handlers = compat.control_handlers()
    for name, guard in GUARDED_COMMANDS.items():
        original = handlers.get(name)
        if original is None or getattr(original, _MARK, False):
            continue
        wrapped = _wrap(original, guard)
        # an alias (``dump_active``...) is the same function under a second name
        for alias, handler in list(handlers.items()):
            if handler is original:
                handlers[alias] = wrapped
