"""``install(app)`` wires partitioning into a Celery app; ``explain_route`` asks the router.

A producer process that installs partitioning and publishes loads no worker code and no
Redis client: the worker side is imported by the ``celeryd_init`` signal, which only a
``celery worker`` process sends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import signals

from .checkpoint_runner import attach_runner
from .eager import install_eager_routing
from .errors import PartitionKeyError
from .router import Route
from .state import Partitioning, attach, partitioning_of
from .validation import check_at_finalize, check_at_worker_start

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["install", "explain_route"]


def _prepend_router(state: Partitioning) -> None:
    """Put the partition router first in ``task_routes`` (and in a router already built)."""
    conf = state.app.conf
    routes = conf.get("task_routes")
    existing = [] if routes is None else list(routes) if isinstance(routes, (list, tuple)) else [routes]
    if not any(r is state.router for r in existing):
        conf.task_routes = (state.router, *existing)
    amqp = vars(state.app).get("amqp")
    router = vars(amqp).get("router") if amqp is not None else None
    if router is not None and not any(r is state.router for r in router.routes):
        router.routes = [state.router, *router.routes]


def install(app: Celery) -> Partitioning:
    """Install partitioning on ``app``: router, queue declaration, start-up checks. Idempotent."""
    state, made = attach(app)
    if not made:
        return state
    attach_runner(app)  # runs the bodies of checkpoint= tasks inside their checkpoints

    def on_configured(sender: Any = None, **_: Any) -> None:
        _prepend_router(state)
        install_eager_routing(app)  # eager calls are routed and validated as publishes are

    if app.configured:
        on_configured()
    else:
        app.on_after_configure.connect(on_configured, weak=False)

    def on_finalized(sender: Any = None, **_: Any) -> None:
        state.registry_error = check_at_finalize(app)

    if app.finalized:
        on_finalized()
    else:
        app.on_after_finalize.connect(on_finalized, weak=False)

    def on_celeryd_init(sender: Any = None, instance: Any = None, options: Any = None,
                        **_: Any) -> None:
        # Only a `celery worker` process gets here: load the worker side now.
        if getattr(instance, "app", None) is app:
            from .worker.hooks import configure_worker

            configure_worker(app, dict(options or {}))

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            check_at_worker_start(app)

    signals.celeryd_init.connect(on_celeryd_init, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    return state


def explain_route(app: Celery, task_name: str, *args: Any, **kwargs: Any) -> Route:
    """Where a call of ``task_name`` with these arguments would go, without publishing it."""
    state = partitioning_of(app)
    task = app.tasks.get(task_name)
    if task is None:
        raise PartitionKeyError(f"unknown task {task_name!r}; is its module imported?")
    route = state.router.route(task_name, args, kwargs, task)
    if route is None:
        raise PartitionKeyError(f"task {task_name} is not partitioned; nothing to explain")
    return route
