"""Testing partitioned tasks: routing assertions, in-process partition workers, a pytest plugin.

A *call* is a Celery signature, ``task.s(*args, **kwargs)``, as the code under test makes it;
routing it runs the key function and publishes nothing. Pytest loads this module as a plugin
(entry point ``pytest11`` ``celery_partitioning``) for the fixtures ``partition_routes`` and
``partition_worker``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from celery import signals

from .app import explain_route, install
from .router import HEADER_COUNT, HEADER_INDEX, HEADER_KEY, HEADER_POOL, Route

if TYPE_CHECKING:
    from celery import Celery

    from .store.leftovers import Leftovers
    from .worker.inprocess import InProcessWorker

__all__ = ["route_of", "assert_same_partition", "assert_routes_to", "RecordedRoute",
           "RouteRecorder", "start_partition_worker", "partition_routes", "partition_worker_app",
           "partition_worker_pools", "partition_worker"]


# -- routing assertions --------------------------------------------------------------------

def route_of(app: Celery, call: Any) -> Route:
    """The Route a call (a signature such as ``task.s("ord-1", qty=2)``) takes in ``app``.

    Raises ``PartitionKeyError`` as a publish would for a bad key, and when the task is
    unknown to ``app`` or not partitioned.
    """
    name = getattr(call, "task", None)
    if not isinstance(name, str):
        raise TypeError(f"a call is a signature such as task.s(...), got {call!r}")
    return explain_route(app, name, *(call.args or ()), **(call.kwargs or {}))


def _describe(call: Any, route: Route) -> str:
    return (f"  {call!r}: key {route.key!r} -> pool {route.pool!r} partition {route.index} "
            f"(of {route.partitions}), queue {route.queue!r}")


def assert_same_partition(app: Celery, *calls: Any) -> Route:
    """Assert that every call goes to one partition (so they run one at a time, in order).

    Returns that partition's Route (of the first call).
    """
    if len(calls) < 2:
        raise TypeError("assert_same_partition needs at least two calls")
    routes = [route_of(app, call) for call in calls]
    if len({(r.pool, r.index) for r in routes}) != 1:
        lines = "\n".join(_describe(c, r) for c, r in zip(calls, routes, strict=True))
        raise AssertionError(f"the calls do not share a partition:\n{lines}")
    return routes[0]


def assert_routes_to(app: Celery, call: Any, *, key: str | None = None, pool: str | None = None,
                     index: int | None = None, queue: str | None = None) -> Route:
    """Assert where a call goes; only the fields given are compared. Returns its Route."""
    route = route_of(app, call)
    expected = {"key": key, "pool": pool, "index": index, "queue": queue}
    wrong = [f"{field} is {getattr(route, field)!r}, expected {want!r}"
             for field, want in expected.items() if want is not None and getattr(route, field) != want]
    if wrong:
        raise AssertionError(f"{call!r} routes elsewhere: {'; '.join(wrong)}\n{_describe(call, route)}")
    return route


# -- recording what a test published or ran eagerly ------------------------------------------

@dataclass(frozen=True)
class RecordedRoute:
    """One partitioned call a test made: the task, its key and its partition."""

    task: str
    key: str
    pool: str
    index: int
    partitions: int
    #: True when it ran in place (``task_always_eager``), False when it was published.
    eager: bool


def _recorded(task: str, headers: Any, eager: bool) -> RecordedRoute | None:
    if not isinstance(headers, dict) or HEADER_KEY not in headers:
        return None
    return RecordedRoute(task, headers[HEADER_KEY], headers[HEADER_POOL], headers[HEADER_INDEX],
                         headers[HEADER_COUNT], eager)


class RouteRecorder:
    """Records partitioned calls from Celery's signals while connected (a context manager).

    Published calls come from ``before_task_publish`` (the headers as they leave the
    producer), eager ones from ``task_prerun`` (the headers eager mode gives the request).
    """

    def __init__(self) -> None:
        self.routes: list[RecordedRoute] = []

    def _on_publish(self, sender: Any = None, headers: Any = None, **_: Any) -> None:
        found = _recorded(str(sender), headers, eager=False)
        if found is not None:
            self.routes.append(found)

    def _on_prerun(self, sender: Any = None, task: Any = None, **_: Any) -> None:
        request = getattr(task, "request", None)
        if request is not None and getattr(request, "is_eager", False):
            found = _recorded(str(getattr(task, "name", sender)), getattr(request, "headers", None),
                              eager=True)
            if found is not None:
                self.routes.append(found)

    def connect(self) -> RouteRecorder:
        signals.before_task_publish.connect(self._on_publish, weak=False)
        signals.task_prerun.connect(self._on_prerun, weak=False)
        return self

    def disconnect(self) -> None:
        signals.before_task_publish.disconnect(self._on_publish)
        signals.task_prerun.disconnect(self._on_prerun)

    def __enter__(self) -> RouteRecorder:
        return self.connect()

    def __exit__(self, *_: object) -> None:
        self.disconnect()

    def keys(self, task: str | None = None) -> list[str]:
        """The keys recorded, in call order (of ``task`` only, if given)."""
        return [r.key for r in self.routes if task is None or r.task == task]

    def partitions(self, task: str | None = None) -> list[tuple[str, int]]:
        """``(pool, index)`` of each recorded call, in call order (of ``task`` only, if given)."""
        return [(r.pool, r.index) for r in self.routes if task is None or r.task == task]

    def clear(self) -> None:
        self.routes.clear()


# -- partition workers in this process -------------------------------------------------------

@contextmanager
def start_partition_worker(app: Celery, pools: str | Iterable[str] | None = None, *,
                           start_timeout: float = 15.0,
                           stop_timeout: float = 30.0) -> Iterator[InProcessWorker]:
    """Run the partition workers of ``app`` (of ``pools``, default all) in this process while
    the block runs; tasks must be registered before it starts.

    Enters once every partition consumes (``start_timeout``: a lease held elsewhere fails
    here, naming it); leaves with a warm stop (running tasks finish within ``stop_timeout``,
    leases are released). Tasks run as in ``celery partitioning worker``, without remote
    control and task events. A partition that fails where a worker process would exit stops,
    keeps its message, and makes the block raise ``InProcessWorkerError``.
    ``worker.partition(pool, index)`` is one partition as a unit: ``stop()`` hands its lease
    over, ``start()`` takes it again, while the others run.
    """
    from .worker.inprocess import InProcessWorker

    with InProcessWorker(app, pools, start_timeout=start_timeout,
                         stop_timeout=stop_timeout) as worker:
        yield worker


# -- pytest plugin (entry point pytest11) ------------------------------------------------------

@pytest.fixture
def partition_routes() -> Iterator[RouteRecorder]:
    """Every partitioned call this test publishes or runs eagerly, as ``RecordedRoute``s."""
    with RouteRecorder() as recorder:
        yield recorder


@pytest.fixture
def partition_worker_app(request: pytest.FixtureRequest) -> Celery:
    """The app ``partition_worker`` runs: override or parametrize it (``indirect=True``); by
    default Celery's ``celery_app`` fixture (``celery_config``, ``celery_includes``) with
    partitioning installed."""
    param = getattr(request, "param", None)
    if param is not None:
        return param
    try:
        app: Celery = request.getfixturevalue("celery_app")
    except pytest.FixtureLookupError:
        raise pytest.UsageError(
            "partition_worker needs an app: override the partition_worker_app fixture to return "
            "yours, or load Celery's pytest plugin for its celery_app fixture "
            "(pytest_plugins = ('celery.contrib.pytest',))") from None
    install(app)
    for module in request.getfixturevalue("celery_includes"):
        app.loader.import_task_module(module)
    return app


@pytest.fixture
def partition_worker_pools() -> str | Iterable[str] | None:
    """The pools ``partition_worker`` runs (default: all); override to narrow them."""
    return None


def _refuse_in_memory_sqlite() -> None:
    """Fail before starting on an in-memory SQLite Django test database (tasks would be
    dead-lettered with "database table is locked")."""
    if "django" not in sys.modules:
        return  # not a Django project: nothing to check, and Django is not imported for it
    from .contrib.django.testing import IN_MEMORY_SQLITE, in_memory_sqlite_aliases

    aliases = in_memory_sqlite_aliases()
    if aliases:
        pytest.fail(f"database(s) {', '.join(map(repr, aliases))}: in-memory SQLite. "
                    f"{IN_MEMORY_SQLITE}", pytrace=False)


def _leftovers(app: Celery, pools: str | Iterable[str] | None) -> Leftovers | None:
    """What the test may leave in the app's store (None: no Redis store configured)."""
    from .state import redis_client, redis_keys, settings_of
    from .store.leftovers import Leftovers
    from .worker.inprocess import hosted_partitions

    settings = settings_of(app)
    if settings.redis is None:
        return None
    hosted = hosted_partitions(app, pools)
    return Leftovers(redis_client(settings.redis), redis_keys(app), {p for p, _ in hosted},
                     [settings.queue_name(p, i) for p, i in hosted])


@pytest.fixture
def partition_worker(partition_worker_app: Celery,
                     partition_worker_pools: str | Iterable[str] | None) -> Iterator[InProcessWorker]:
    """The partition workers of ``partition_worker_app``, in this process, for one test
    (:func:`start_partition_worker`): started before the test, warmly stopped after it.

    Afterwards the partition state the test added is removed (dead letters, parked and
    set-aside messages, keys in retry backoff, attempt records), so the next test, or the next
    run of this one, starts clean; what was there before the test is left alone."""
    _refuse_in_memory_sqlite()
    leftovers = _leftovers(partition_worker_app, partition_worker_pools)
    if leftovers is not None:
        leftovers.before()
    try:
        with start_partition_worker(partition_worker_app, partition_worker_pools) as worker:
            yield worker
    finally:
        if leftovers is not None:
            try:
                leftovers.remove_added()
            finally:
                leftovers.client.close()
