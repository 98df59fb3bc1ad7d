"""Testing partitioned tasks without a broker: routing assertions and a pytest plugin.

A *call* is a Celery signature, ``task.s(*args, **kwargs)``, so a test names a call exactly
as the code under test makes it. ``route_of`` gives its ``Route`` (``explain_route``: the
key function runs, nothing is published); ``assert_same_partition`` and ``assert_routes_to``
turn that into assertions whose failures show every route involved.

Installed with the package, pytest loads this module as a plugin (entry point ``pytest11``
``celery_partitioning``), which adds the fixture ``partition_routes``: a ``RouteRecorder``
of every partitioned call the test publishes or runs eagerly (``task_always_eager``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from celery import signals

from .app import explain_route
from .router import HEADER_COUNT, HEADER_INDEX, HEADER_KEY, HEADER_POOL, Route

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "route_of",
    "assert_same_partition",
    "assert_routes_to",
    "RecordedRoute",
    "RouteRecorder",
    "partition_routes",
]


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


# -- pytest plugin (entry point pytest11) ------------------------------------------------------

@pytest.fixture
def partition_routes() -> Iterator[RouteRecorder]:
    """Every partitioned call this test publishes or runs eagerly, as ``RecordedRoute``s."""
    with RouteRecorder() as recorder:
        yield recorder
