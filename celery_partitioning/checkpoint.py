"""Effectively-once effects: a task body and its ``(projection, key)`` checkpoint in one transaction.

A task declared with ``checkpoint=`` names the event *position* of each call (an argument
name, or a function of the arguments): an ``int`` that increases per partition key. The router
computes it at publish and sends it in the ``partition_position`` header; a message at or
below its key's checkpoint is skipped. ``checkpoint=MESSAGE_ID`` deduplicates by message id
instead, within a bounded window per key.

A leaf module (the decorators and the router use it); ``checkpoint_runner`` runs the bodies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from .errors import PartitionConfigError, PartitionKeyError
from .keys import argument_names, call_on_arguments

__all__ = ["HEADER_POSITION", "MESSAGE_ID", "RUNNER_ATTRIBUTE", "Mark", "CheckpointStore",
           "CheckpointField", "check_checkpoint", "position_of", "checkpointed",
           "wrapper_chain"]

#: Message header: the event position of a call of a task declared with ``checkpoint=``.
HEADER_POSITION: Final = "partition_position"
#: Largest position accepted (a signed 64-bit database column holds it).
MAX_POSITION: Final = 2**63 - 1
#: Attribute of the Celery app holding its ``checkpoint_runner.CheckpointRunner`` (set by install).
RUNNER_ATTRIBUTE: Final = "_celery_partitioning_checkpoints"


class _MessageId:
    """The ``checkpoint=MESSAGE_ID`` marker: no position, deduplicate by message id."""

    def __repr__(self) -> str:
        return "MESSAGE_ID"

    def __reduce__(self) -> str:
        return "MESSAGE_ID"


#: ``checkpoint=MESSAGE_ID``: the events have no position; skip a message whose id is among
#: the last ``partitioning_dedupe_window`` ids applied for its (projection, key).
MESSAGE_ID: Final = _MessageId()

#: What ``checkpoint=`` accepts: an argument name, a function of the arguments, or MESSAGE_ID.
CheckpointField = str | Callable[[Mapping[str, Any]], Any] | _MessageId


@dataclass(frozen=True)
class Mark:
    """One message's claim on a checkpoint: what a store checks and records."""

    #: The projection name (the task name for a ``partitioned`` task).
    projection: str
    #: The partition key of the message.
    key: str
    #: The event position; None for ``checkpoint=MESSAGE_ID``.
    position: int | None
    #: The message (task) id.
    message_id: str
    #: How many message ids to remember per (projection, key) when ``position`` is None.
    window: int


@runtime_checkable
class CheckpointStore(Protocol):
    """Where checkpoints live; it owns the transaction the task body runs in (the Django one:
    ``contrib.django.checkpoints.DjangoCheckpointStore``).

    ``atomic(mark)`` begins a transaction, decides whether the message is new (position above
    the checkpoint, or id not in the window), records it (or counts a skip) and yields that
    verdict; the body runs in the block only when it is True. Leaving the block commits the
    body's writes and the checkpoint together; an exception rolls both back. Two transactions
    for one (projection, key) must never both commit: lock the row or update it conditionally.
    """

    def atomic(self, mark: Mark) -> AbstractContextManager[bool]: ...


def check_checkpoint(value: object, where: str) -> None:
    """Reject a bad ``checkpoint=`` when the task is declared."""
    if isinstance(value, _MessageId) or callable(value):
        return
    if isinstance(value, str) and value.isidentifier():
        return
    raise PartitionConfigError(
        f"{where}: checkpoint must be the name of the argument holding the event position, "
        f"a function of the arguments returning it, or MESSAGE_ID; got {value!r}"
    )


def _describe(checkpoint: CheckpointField) -> str:
    return f"argument {checkpoint!r}" if isinstance(checkpoint, str) else f"function {checkpoint!r}"


def position_of(task_name: str, checkpoint: CheckpointField, named: Mapping[str, Any]) -> int | None:
    """The position of a call (its arguments by name), or None for MESSAGE_ID.

    Positions are ``int`` from 0 to 2**63-1 (not ``bool``); anything else, a missing
    argument or an exception in the function is a ``PartitionKeyError``.
    """
    if isinstance(checkpoint, _MessageId):
        return None
    where = f"task {task_name}: checkpoint {_describe(checkpoint)}"
    if isinstance(checkpoint, str):
        if checkpoint not in named:
            raise PartitionKeyError(
                f"{where} is missing from the call (arguments: {argument_names(named)}); pass "
                "the event position; nothing was published")
        value = named[checkpoint]
    else:
        value = call_on_arguments(where, checkpoint, named)
    if type(value) is not int or not 0 <= value <= MAX_POSITION:
        raise PartitionKeyError(
            f"{where} gave {value!r} on arguments ({argument_names(named)}); an event position "
            "must be an int from 0 to 2**63-1 that increases per partition key; nothing was published")
    return value


def wrapper_chain(fun: Any) -> Iterator[Any]:
    """``fun``, then what it wraps (``__func__``, ``__wrapped__``), outermost first: a worker
    or another library may wrap a task's ``run`` or ``apply_async``. Bounded, as a chain may loop."""
    for _ in range(16):
        if fun is None:
            return
        yield fun
        fun = getattr(fun, "__func__", None) or getattr(fun, "__wrapped__", None)


def _running_task(wrapper: Callable[..., Any]) -> Any:
    """The Celery task currently running ``wrapper`` as its body, else None (a plain call)."""
    from celery import current_task

    task = current_task._get_current_object() if current_task else None
    chain = wrapper_chain(getattr(task, "run", None))
    return task if any(fun is wrapper for fun in chain) else None


def _is_bound(task: Any) -> bool:
    """Whether the task was declared with ``bind=True``: Celery stores an unbound body as a
    ``staticmethod``, and the class says so even when a worker wrapped the instance's ``run``."""
    run = inspect.getattr_static(type(task), "run", None)
    return inspect.isfunction(run)


def checkpointed(fun: Callable[..., Any], checkpoint: CheckpointField,
                 projection: str | None) -> Callable[..., Any]:
    """Wrap a task function: run as a Celery task, it runs inside its checkpoint (the app's
    ``CheckpointRunner`` does it); called as a plain function, the body just runs."""

    @functools.wraps(fun)
    def run_checkpointed(*args: Any, **kwargs: Any) -> Any:
        task = _running_task(run_checkpointed)
        if task is None:
            return fun(*args, **kwargs)
        runner = vars(task.app).get(RUNNER_ATTRIBUTE)
        if runner is None:
            raise PartitionConfigError(
                f"task {task.name} has checkpoint= but celery_partitioning is not installed on "
                f"app {task.app.main!r}; call celery_partitioning.install(app)"
            )
        call_args = args[1:] if _is_bound(task) else args
        return runner.run(task, fun, args, kwargs, call_args=call_args, checkpoint=checkpoint,
                          projection=projection)

    return run_checkpointed
