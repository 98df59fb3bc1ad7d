"""DCB conflict retries: ``DCBConflict`` and ``with_dcb_retry``, serialized on the ``dcb`` pool.

A DCB (dynamic consistency boundary) command reads the events of a *scope*, decides, and
appends only if the scope's version has not moved; else it raises :class:`DCBConflict`::

    @app.task
    @with_dcb_retry(scope_key="tenant:{tenant_id}:reservation:{reservation_id}", max_attempts=5)
    def reserve(tenant_id, reservation_id, qty):
        version = store.version(scope)            # read
        ...                                       # decide
        if not store.append_if(scope, version, event):
            raise DCBConflict(scope, expected_version=version)

Every operation on a scope, new or retried, routes by the same key, so a retry never runs
beside or after a newer operation on its scope. Other tasks that touch a scope route with
:func:`dcb_partition_key`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from .errors import DCBConflict, PartitionConfigError, PartitionKeyError
from .keys import KeyFunction, argument_names, create_dcb_partition_key
from .tasks import partitioned

__all__ = ["DCBConflict", "DCB_POOL", "ScopeKey", "dcb_backoff", "dcb_partition_key",
           "with_dcb_retry"]

F = TypeVar("F", bound=Callable[..., Any])

#: The pool DCB commands and their conflict retries run on.
DCB_POOL: Final = "dcb"
#: Longest wait between two attempts (seconds).
MAX_BACKOFF: Final = 30.0

#: A scope: a literal scope key, a ``str.format`` template over the task's arguments
#: (``"tenant:{tenant_id}:reservation:{reservation_id}"``), or a function of the arguments
#: mapping (like a key function) returning the scope key.
ScopeKey = str | Callable[[Mapping[str, Any]], str]


def dcb_backoff(retries: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry ``retries + 1``: ``min(30, 0.1 * 2**retries * U[0.5, 1.5])``."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return min(MAX_BACKOFF, 0.1 * (2.0 ** min(retries, 64)) * (0.5 + rng()))


def _scope_function(scope_key: ScopeKey) -> Callable[[Mapping[str, Any]], str]:
    if callable(scope_key):
        return scope_key
    if not isinstance(scope_key, str) or not scope_key:
        raise PartitionConfigError(
            "with_dcb_retry: scope_key must be a scope key, a template such as "
            f"'tenant:{{tenant_id}}:reservation:{{reservation_id}}', or a function, got {scope_key!r}")
    if "{" not in scope_key:
        return lambda _args: scope_key

    def from_template(args: Mapping[str, Any]) -> str:
        try:
            return scope_key.format_map(args)
        except (KeyError, IndexError, ValueError) as exc:
            raise PartitionKeyError(f"scope template {scope_key!r} needs argument {exc}; the call "
                                    f"has {argument_names(args)}") from None

    return from_template


def dcb_partition_key(scope_key: ScopeKey) -> KeyFunction:
    """The key function of a DCB scope: the call's arguments → ``create_dcb_partition_key(scope)``.

    Use it with ``@partitioned(..., pool="dcb")`` for any task that must serialize with
    ``with_dcb_retry`` operations on the same scope.
    """
    scope = _scope_function(scope_key)

    def dcb_key(args: Mapping[str, Any]) -> str:
        value = scope(args)
        if not isinstance(value, str) or not value:
            raise PartitionKeyError(f"the scope key function returned {value!r}; "
                                    "it must return a non-empty str")
        return create_dcb_partition_key(value)

    dcb_key.__qualname__ = dcb_key.__name__ = f"dcb_partition_key({scope_key!r})"
    return dcb_key


def with_dcb_retry(scope_key: ScopeKey, *, max_attempts: int = 5,
                   pool: str = DCB_POOL) -> Callable[[F], F]:
    """Decorate a task function (below ``@app.task``): DCB conflicts are retried in place.

    The task becomes partitioned on ``pool`` by ``create_dcb_partition_key(scope)``. A
    :class:`DCBConflict` calls ``task.retry`` with :func:`dcb_backoff` and
    ``max_retries=max_attempts - 1``: the key waits (``partitioning_retry_hold_below``: the
    partition with it), then the same message runs again before anything behind it. After
    the last attempt it is dead-lettered (``DCB_MAX_RETRIES_EXCEEDED``) and the key parked.
    Other exceptions keep the task's retry policy; a direct call lets the conflict propagate.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise PartitionConfigError(f"with_dcb_retry: max_attempts must be an int >= 1, "
                                   f"got {max_attempts!r}")
    key = dcb_partition_key(scope_key)

    def decorate(fun: F) -> F:
        from celery.app.task import Task
        from celery.local import Proxy

        if isinstance(fun, (Task, Proxy)) or not callable(fun):
            raise PartitionConfigError(
                "with_dcb_retry decorates the task function: put it below @app.task / "
                "@shared_task, directly above def")

        @functools.wraps(fun)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fun(*args, **kwargs)
            except DCBConflict as exc:
                from celery import current_task

                task = current_task
                if task is None or task.request.called_directly:
                    raise
                retries = int(task.request.retries or 0)
                raise task.retry(exc=exc, countdown=dcb_backoff(retries),
                                 max_retries=max_attempts - 1) from None

        return partitioned(key, pool=pool)(run)  # type: ignore[return-value]

    return decorate
