"""Effectively-once effects: a task body and its ``(projection, key)`` checkpoint in one transaction.

A task declared with ``checkpoint=`` names the event *position* of each call (an argument
name, or a function of the arguments by name, like a key function): an ``int`` that increases
per partition key. The router computes it at publish (a missing or bad position is a
``PartitionKeyError``, nothing published) and carries it in the ``partition_position`` header.
When the task runs, a :class:`CheckpointStore` opens a transaction, advances the checkpoint
row only if the position is above it, and runs the body inside the same transaction; a
message at or below the checkpoint is skipped (acked, logged at info, counted).
``checkpoint=MESSAGE_ID`` deduplicates by message id instead, within a bounded window per key.

The Django store is ``celery_partitioning.contrib.django.checkpoints.DjangoCheckpointStore``;
any other database plugs in through the small :class:`CheckpointStore` protocol.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from .errors import PartitionConfigError, PartitionKeyError

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "HEADER_POSITION",
    "MESSAGE_ID",
    "Mark",
    "CheckpointStore",
    "CheckpointField",
    "check_checkpoint",
    "position_of",
    "checkpointed",
    "checkpoint_store_of",
]

logger = logging.getLogger("celery_partitioning.checkpoint")

#: Message header: the event position of a call of a task declared with ``checkpoint=``.
HEADER_POSITION: Final = "partition_position"
#: Largest position accepted (a signed 64-bit database column holds it).
MAX_POSITION: Final = 2**63 - 1
#: Attribute of the Celery app holding its resolved checkpoint store.
_STORE_ATTRIBUTE: Final = "_celery_partitioning_checkpoints"


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
    """Where checkpoints live; it owns the transaction the task body runs in.

    ``atomic(mark)`` is a context manager: it begins a transaction, decides whether the
    message is new (position above the checkpoint, or id not in the window) and records it,
    then yields that verdict. The caller runs the task body inside the block only when the
    verdict is True. Leaving the block normally commits (the body's writes and the
    checkpoint together); an exception rolls both back. A store also counts skipped
    messages, in the same transaction. Two transactions for the same (projection, key)
    must never both commit: lock the row, or update it conditionally.
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
    seen = ", ".join(sorted(map(str, named))) or "no arguments"
    if isinstance(checkpoint, str):
        if checkpoint not in named:
            raise PartitionKeyError(
                f"{where} is missing from the call (arguments: {seen}); pass the event "
                "position; nothing was published"
            )
        value = named[checkpoint]
    else:
        try:
            value = checkpoint(named)
        except PartitionKeyError as exc:
            raise PartitionKeyError(f"{where} failed on arguments ({seen}): {exc}; "
                                    "nothing was published") from None
        except Exception as exc:
            raise PartitionKeyError(
                f"{where} raised {type(exc).__name__}: {exc} on arguments ({seen}); "
                "nothing was published"
            ) from exc
    if type(value) is not int or not 0 <= value <= MAX_POSITION:
        raise PartitionKeyError(
            f"{where} gave {value!r} on arguments ({seen}); an event position must be an int "
            f"from 0 to 2**63-1 that increases per partition key; nothing was published"
        )
    return value


def _load(path: str) -> Any:
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise PartitionConfigError(
            f"setting partitioning_checkpoint_store is {path!r}; use 'package.module:Class'"
        )
    try:
        found = importlib.import_module(module)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise PartitionConfigError(
            f"setting partitioning_checkpoint_store is {path!r}, which cannot be imported: {exc}"
        ) from None
    return found


#: The Django store, the default when its Django app is installed.
DJANGO_STORE: Final = "celery_partitioning.contrib.django.checkpoints:DjangoCheckpointStore"


def _django_store_installed() -> bool:
    import sys

    if "django" not in sys.modules:  # Django not in use: never import it from here
        return False
    module = importlib.import_module("celery_partitioning.contrib.django.checkpoints")
    return bool(module.django_store_installed())


def resolve_store(app: Celery) -> CheckpointStore | None:
    """The app's checkpoint store, made from its settings (not cached), or None."""
    from .app import settings_of

    configured = settings_of(app).checkpoint_store
    if configured is None:
        if not _django_store_installed():
            return None
        configured = DJANGO_STORE
    if isinstance(configured, str):
        configured = _load(configured)
    store = configured(app) if inspect.isclass(configured) or (
        callable(configured) and not hasattr(configured, "atomic")) else configured
    if not isinstance(store, CheckpointStore):
        raise PartitionConfigError(
            f"setting partitioning_checkpoint_store gave {store!r}, which has no atomic(mark) "
            "method (see celery_partitioning.checkpoint.CheckpointStore)"
        )
    return store


def checkpoint_store_of(app: Celery) -> CheckpointStore | None:
    """The app's checkpoint store (made on first use, kept on the app), or None."""
    found: CheckpointStore | None = vars(app).get(_STORE_ATTRIBUTE)
    if found is None:
        found = resolve_store(app)
        if found is not None:
            setattr(app, _STORE_ATTRIBUTE, found)
    return found


class _Binders:
    """Per-wrapper cache of the key binder of each task the wrapped function is registered as."""

    def __init__(self) -> None:
        self.by_task: dict[str, Any] = {}

    def __call__(self, task: Any) -> Any:
        from .tasks import KeyBinder, spec_of

        binder = self.by_task.get(task.name)
        if binder is None:
            spec = spec_of(task)
            if spec is None or spec.key is None:
                raise PartitionConfigError(f"task {task.name} has checkpoint= but no partition key")
            binder = KeyBinder(task.name, spec.key, task.run)
            self.by_task[task.name] = binder
        return binder


def _running_task(wrapper: Callable[..., Any]) -> Any:
    """The Celery task currently running ``wrapper`` as its body, else None (a plain call).

    The task's ``run`` may itself be wrapped (``functools.wraps``) by a worker: the chain of
    ``__wrapped__`` / ``__func__`` leads back to ``wrapper``.
    """
    from celery import current_task

    task = current_task._get_current_object() if current_task else None
    if task is None:
        return None
    fun: Any = getattr(task, "run", None)
    for _ in range(16):
        if fun is wrapper:
            return task
        if fun is None:
            break
        fun = getattr(fun, "__func__", None) or getattr(fun, "__wrapped__", None)
    return None


def checkpointed(fun: Callable[..., Any], checkpoint: CheckpointField,
                 projection: str | None) -> Callable[..., Any]:
    """Wrap a task function: when it runs as a Celery task, run it inside its checkpoint.

    Called as a plain function (``task.run(...)`` outside Celery), it just runs the body.
    Bound tasks (``bind=True``) receive the task first; it is passed through untouched.
    """
    binders = _Binders()

    @functools.wraps(fun)
    def run_checkpointed(*args: Any, **kwargs: Any) -> Any:
        task = _running_task(run_checkpointed)
        if task is None:
            return fun(*args, **kwargs)
        call_args = args[1:] if _is_bound(task) else args
        request = task.request
        store = checkpoint_store_of(task.app)
        if store is None:
            raise PartitionConfigError(
                f"task {task.name} has checkpoint= but app {task.app.main!r} has no checkpoint "
                "store; add 'celery_partitioning.contrib.django' to INSTALLED_APPS or set "
                "partitioning_checkpoint_store"
            )
        from .router import HEADER_KEY

        key = getattr(request, HEADER_KEY, None)  # the key the message was routed by
        if not isinstance(key, str) or not key:
            key = binders(task)(call_args, kwargs)
        position = getattr(request, HEADER_POSITION, None)
        if type(position) is not int:
            position = position_of(task.name, checkpoint,
                                   binders(task).arguments(call_args, kwargs))
        from .app import settings_of

        mark = Mark(projection=projection or task.name, key=key, position=position,
                    message_id=str(request.id or ""), window=settings_of(task.app).dedupe_window)
        with store.atomic(mark) as fresh:
            if not fresh:
                logger.info(
                    "%s[%s]: skipped, already applied (projection %s, key %s, %s)",
                    task.name, request.id, mark.projection, key,
                    f"position {position}" if position is not None else "message id seen")
                return None
            return fun(*args, **kwargs)

    return run_checkpointed


def _is_bound(task: Any) -> bool:
    """Whether the task was declared with ``bind=True`` (its body receives the task first).

    Celery stores a function task's body as a ``staticmethod`` unless it is bound; the class
    attribute says so even when a worker has wrapped the instance's ``run``.
    """
    run = inspect.getattr_static(type(task), "run", None)
    return inspect.isfunction(run)


def checkpoint_problems(tasks: Any) -> list[str]:
    """One line per task declared with ``checkpoint=`` whose app has no checkpoint store."""
    from .tasks import spec_of

    problems: list[str] = []
    verdicts: dict[int, str | None] = {}
    for task in sorted(tasks, key=lambda t: str(getattr(t, "name", t))):
        spec = spec_of(task)
        app = getattr(task, "app", None)
        if spec is None or spec.checkpoint is None or app is None:
            continue
        if id(app) not in verdicts:
            try:
                store = resolve_store(app)
            except PartitionConfigError as exc:
                verdicts[id(app)] = str(exc)
            else:
                verdicts[id(app)] = None if store is not None else (
                    "its app has no checkpoint store; add 'celery_partitioning.contrib.django' "
                    "to INSTALLED_APPS, or set partitioning_checkpoint_store "
                    "(see celery_partitioning.checkpoint.CheckpointStore)")
        problem = verdicts[id(app)]
        if problem is not None:
            what = (f"projection {spec.projection!r} (task {task.name})" if spec.projection
                    else f"task {task.name}")
            problems.append(f"{what}: has checkpoint= but {problem}")
    return problems


def checkpoint_stats(app: Celery) -> dict[str, Any] | None:
    """Per projection with a checkpoint: keys, applied, skipped (for ``status``); None if none.

    Imports the app's task modules (to know which tasks have ``checkpoint=``) and asks the
    store for ``stats()`` when it has one; a store without it, or one that cannot be read,
    gives ``{"error": ...}``.
    """
    from .tasks import spec_of

    app.loader.import_default_modules()
    names = sorted({spec.projection or task.name for task in app.tasks.values()
                    if (spec := spec_of(task)) is not None and spec.checkpoint is not None})
    if not names:
        return None
    try:
        store = checkpoint_store_of(app)
        stats = getattr(store, "stats", None)
        if stats is None:
            return {"error": f"the checkpoint store {store!r} has no stats()"}
        found: dict[str, Any] = stats()
    except Exception as exc:  # noqa: BLE001 - status reports, it does not fail
        return {"error": f"cannot read the checkpoints: {type(exc).__name__}: {exc}"}
    return {name: found.get(name, {"keys": 0, "applied": 0, "skipped": 0, "last_update": None})
            for name in names}


def render_checkpoint_stats(stats: Mapping[str, Any]) -> str:
    """The checkpoint table under ``status``: one line per projection."""
    if "error" in stats:
        return f"checkpoints: {stats['error']}"
    header = ("PROJECTION", "KEYS", "APPLIED", "SKIPPED", "LAST UPDATE")
    table = [header] + [
        (name, str(row["keys"]), str(row["applied"]), str(row["skipped"]), row["last_update"] or "-")
        for name, row in stats.items()
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in table)
