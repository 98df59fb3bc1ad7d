"""Eager mode (``task_always_eager``) routes a partitioned call as a real publish would.

In eager mode Celery never consults the routers, so a bad key or a fixed ``queue=`` would pass
a test suite and fail in production. ``install(app)`` puts ``around_apply_async`` on every task
class through Celery's task annotations (``"@apply_async"``): an eager call is routed as
``send_task`` would route it (same errors), and its request carries the partition headers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, Final

from .checkpoint import wrapper_chain
from .compat import reset_annotations, task_call_hooks, task_exec_options, task_registry
from .tasks import spec_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["around_apply_async", "EagerRouting", "install_eager_routing"]

#: Marker attribute on the wrapper, so a task class is never wrapped twice.
_MARK: Final = "__celery_partitioning_eager__"

ApplyAsync = Callable[..., Any]


def _route_eagerly(task: Any, args: Any, kwargs: Any, options: dict[str, Any]) -> None:
    """Run the app's routers on an eager call as ``send_task`` would; raise what they raise."""
    check_arguments, _, _ = task_call_hooks(task)
    if check_arguments is not None:
        # ``apply_async`` checks the arguments before it routes: a TypeError comes first.
        check_arguments(*(args or ()), **(kwargs or {}))
    app = task.app
    routed = dict(task_exec_options(task), **options)
    routed = app.amqp.router.route(routed, task.name, args, kwargs, task)
    headers = routed.get("headers")
    if headers:
        options["headers"] = dict(headers)


def _is_wrapped(apply_async: Any) -> bool:
    return any(getattr(fun, _MARK, False) for fun in wrapper_chain(apply_async))


def around_apply_async(apply_async: ApplyAsync) -> ApplyAsync:
    """Wrap ``Task.apply_async`` (Celery's ``add_around`` protocol): eager calls are routed too."""
    if _is_wrapped(apply_async):
        return apply_async

    @wraps(apply_async)
    def apply_async_routed(self: Any, args: Any = None, kwargs: Any = None,
                           *rest: Any, **options: Any) -> Any:
        if self.app.conf.task_always_eager and spec_of(self) is not None:
            _route_eagerly(self, args, kwargs, options)
        return apply_async(self, args, kwargs, *rest, **options)

    setattr(apply_async_routed, _MARK, True)
    return apply_async_routed


class EagerRouting:
    """A ``task_annotations`` entry that puts ``around_apply_async`` on every task class.

    Celery applies only the first annotation that names a task (and the first ``"*"``
    one), so this entry goes first and carries the next matching entry's attributes
    along: the user's own annotations keep working, an ``"@apply_async"`` of theirs runs
    around ours, as it runs before the routers when a call is published.
    """

    @staticmethod
    def _next_match(task: Any) -> dict[str, Any] | None:
        # ``task`` is the task class being bound; its app holds the prepared annotations.
        for entry in task.app.annotations:
            if isinstance(entry, EagerRouting):
                continue
            annotate = getattr(entry, "annotate", None)
            found = annotate(task) if annotate is not None else None
            if found is not None:
                return dict(found)
        return None

    def annotate(self, task: Any) -> dict[str, Any]:
        found = self._next_match(task) or {}
        theirs = found.get("@apply_async")
        if theirs is None:
            found["@apply_async"] = around_apply_async
        else:
            found["@apply_async"] = lambda orig: theirs(around_apply_async(orig))
        return found

    def __repr__(self) -> str:
        return "celery_partitioning.eager.EagerRouting()"


def install_eager_routing(app: Celery) -> None:
    """Put ``EagerRouting`` first in ``app.conf.task_annotations``; wrap tasks already bound."""
    entries = app.conf.task_annotations
    if entries is None:
        entries = []
    elif not isinstance(entries, (list, tuple)):
        entries = [entries]
    if not any(isinstance(e, EagerRouting) for e in entries):
        app.conf.task_annotations = [EagerRouting(), *entries]
        reset_annotations(app)  # Celery caches the prepared list on first use
    for task in list(task_registry(app).values()):
        cls = type(task)
        if cls.__dict__.get("__bound__") and not _is_wrapped(cls.apply_async):
            # Annotated already, without us: wrap whatever is there (theirs included).
            cls.apply_async = around_apply_async(cls.apply_async)
