"""Running a task body inside its checkpoint; finding an app's checkpoint store.

``install(app)`` attaches a :class:`CheckpointRunner` to the app, which ``checkpoint=``'s
wrapper hands each run to. It builds the message's ``Mark`` from its headers (from its
arguments for eager calls) and runs the body inside ``store.atomic(mark)``. Also here: the
start-up check for a missing store and the per-projection counts ``status`` shows.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from kombu.utils.imports import symbol_by_name

from .checkpoint import (
    HEADER_POSITION,
    RUNNER_ATTRIBUTE,
    CheckpointField,
    CheckpointStore,
    Mark,
    position_of,
)
from .errors import PartitionConfigError
from .router import HEADER_KEY
from .state import settings_of
from .tasks import KeyBinder, spec_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CheckpointRunner", "attach_runner", "resolve_store", "checkpoint_problems",
           "checkpoint_stats", "render_checkpoint_stats", "DJANGO_STORE"]

logger = logging.getLogger("celery_partitioning.checkpoint")


def _load(path: str) -> Any:
    """``package.module:Class`` (or dotted) through kombu's loader, as Celery loads its own."""
    try:
        return symbol_by_name(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PartitionConfigError(
            f"setting partitioning_checkpoint_store is {path!r}, which cannot be imported "
            f"({exc}); use 'package.module:Class'") from None


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


class CheckpointRunner:
    """Runs the bodies of one app's ``checkpoint=`` tasks inside their checkpoints."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._store: CheckpointStore | None = None
        self._binders: dict[str, KeyBinder] = {}

    @property
    def store(self) -> CheckpointStore | None:
        """The app's checkpoint store (made on first use), or None when it has none."""
        if self._store is None:
            self._store = resolve_store(self.app)
        return self._store

    def _binder(self, task: Any) -> KeyBinder:
        binder = self._binders.get(task.name)
        if binder is None:
            spec = spec_of(task)
            if spec is None or spec.key is None:
                raise PartitionConfigError(f"task {task.name} has checkpoint= but no partition key")
            binder = KeyBinder(task.name, spec.key, task.run)
            self._binders[task.name] = binder
        return binder

    def run(self, task: Any, fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            *, call_args: tuple[Any, ...], checkpoint: CheckpointField,
            projection: str | None) -> Any:
        """Run ``fun(*args, **kwargs)`` as ``task``'s body inside its checkpoint; None if skipped."""
        store = self.store
        if store is None:
            raise PartitionConfigError(
                f"task {task.name} has checkpoint= but app {task.app.main!r} has no checkpoint "
                "store; add 'celery_partitioning.contrib.django' to INSTALLED_APPS or set "
                "partitioning_checkpoint_store"
            )
        request = task.request
        key = getattr(request, HEADER_KEY, None)  # the key the message was routed by
        if not isinstance(key, str) or not key:
            key = self._binder(task)(call_args, kwargs)
        position = getattr(request, HEADER_POSITION, None)
        if type(position) is not int:
            position = position_of(task.name, checkpoint,
                                   self._binder(task).arguments(call_args, kwargs))
        mark = Mark(projection=projection or task.name, key=key, position=position,
                    message_id=str(request.id or ""), window=settings_of(self.app).dedupe_window)
        with store.atomic(mark) as fresh:
            if not fresh:
                logger.info(
                    "%s[%s]: skipped, already applied (projection %s, key %s, %s)",
                    task.name, request.id, mark.projection, key,
                    f"position {position}" if position is not None else "message id seen")
                return None
            return fun(*args, **kwargs)


def attach_runner(app: Celery) -> CheckpointRunner:
    """The app's CheckpointRunner, attached on first call (``install(app)`` calls it)."""
    runner = vars(app).get(RUNNER_ATTRIBUTE)
    if not isinstance(runner, CheckpointRunner):
        runner = CheckpointRunner(app)
        setattr(app, RUNNER_ATTRIBUTE, runner)
    return runner


def checkpoint_problems(tasks: Iterable[Any]) -> list[str]:
    """One line per task declared with ``checkpoint=`` whose app has no checkpoint store."""
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
    """Per projection with a checkpoint: keys, applied, skipped (for ``status``); None if none,
    ``{"error": ...}`` if the store has no ``stats()`` or cannot be read."""
    app.loader.import_default_modules()
    names = sorted({spec.projection or task.name for task in app.tasks.values()
                    if (spec := spec_of(task)) is not None and spec.checkpoint is not None})
    if not names:
        return None
    try:
        store = attach_runner(app).store
        if store is None:
            return {"error": "the app has no checkpoint store"}
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
