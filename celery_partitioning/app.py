"""``install(app)``: wire the partition router, queues and start-up checks into a Celery app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from celery import signals

from .config import PartitioningSettings, read_settings
from .errors import PartitionConfigError, PartitionKeyError
from .router import PartitionRouter, Route
from .validation import check_at_finalize, check_at_worker_start

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["install", "Partitioning", "explain_route", "settings_of", "partitioning_of"]

#: Attribute of the Celery app that holds its Partitioning object.
STATE_ATTRIBUTE: Final = "_celery_partitioning"


class Partitioning:
    """The partitioning state of one Celery app (settings, router, registry verdict)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._settings: PartitioningSettings | None = None
        self.registry_error: PartitionConfigError | None = None
        self.router = PartitionRouter(
            settings=lambda: self.settings,
            lookup_task=self._lookup_task,
            exchange=lambda: self.app.amqp.default_exchange,
            registry_error=lambda: self.registry_error,
        )

    @property
    def settings(self) -> PartitioningSettings:
        """The app's validated settings, read once on first use."""
        if self._settings is None:
            self._settings = read_settings(self.app.conf)
        return self._settings

    def _lookup_task(self, name: str) -> Any:
        # The registry itself: looking a name up must not finalize the app.
        return self.app._tasks.get(name)

    def _prepend_router(self) -> None:
        conf = self.app.conf
        routes = conf.get("task_routes")
        existing = [] if routes is None else list(routes) if isinstance(routes, (list, tuple)) else [routes]
        if not any(r is self.router for r in existing):
            conf.task_routes = (self.router, *existing)
        amqp = vars(self.app).get("amqp")
        router = vars(amqp).get("router") if amqp is not None else None
        if router is not None and not any(r is self.router for r in router.routes):
            router.routes = [self.router, *router.routes]


def partitioning_of(app: Celery) -> Partitioning:
    """The Partitioning object of an installed app; ``PartitionConfigError`` if not installed."""
    state = vars(app).get(STATE_ATTRIBUTE)
    if not isinstance(state, Partitioning):
        raise PartitionConfigError(
            f"celery_partitioning is not installed on app {app.main!r}; "
            "call celery_partitioning.install(app) where the app is created"
        )
    return state


def settings_of(app: Celery) -> PartitioningSettings:
    """The partitioning settings of an app (installed or not)."""
    state = vars(app).get(STATE_ATTRIBUTE)
    return state.settings if isinstance(state, Partitioning) else read_settings(app.conf)


def install(app: Celery) -> Partitioning:
    """Install partitioning on ``app``: router, queue declaration, start-up checks. Idempotent."""
    state = vars(app).get(STATE_ATTRIBUTE)
    if isinstance(state, Partitioning):
        return state
    state = Partitioning(app)
    setattr(app, STATE_ATTRIBUTE, state)

    if app.configured:
        state._prepend_router()
    else:
        app.on_after_configure.connect(lambda sender, **_: state._prepend_router(), weak=False)

    def on_finalized(sender: Any = None, **_: Any) -> None:
        state.registry_error = check_at_finalize(app)

    if app.finalized:
        on_finalized()
    else:
        app.on_after_finalize.connect(on_finalized, weak=False)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            check_at_worker_start(app)

    signals.worker_init.connect(on_worker_init, weak=False)

    # Partition worker processes (``celery partitioning worker``): lease, recovery, gates.
    from .worker.hooks import install_worker_hooks

    install_worker_hooks(app)
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
