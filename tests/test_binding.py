"""Key binding agrees with Python's own argument binding on every parameter kind."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from celery_partitioning import PartitionKeyError
from celery_partitioning.tasks import KeyBinder


def f1(a: Any, b: Any, c: Any = 3) -> None: ...
def f2(a: Any, /, b: Any, *, c: Any, d: Any = 4) -> None: ...
def f3(a: Any, *rest: Any, **extra: Any) -> None: ...
def f4(*, order_id: Any) -> None: ...
def f5(**event: Any) -> None: ...


CALLS: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
    (f1, (1, 2), {}), (f1, (1,), {"b": 2}), (f1, (), {"a": 1, "b": 2, "c": 5}), (f1, (1, 2, 3, 4), {}),
    (f1, (1,), {"a": 1, "b": 2}), (f1, (1,), {}), (f1, (1, 2), {"z": 1}),
    (f2, (1, 2), {"c": 3}), (f2, (1,), {"b": 2, "c": 3, "d": 9}), (f2, (), {"a": 1, "b": 2, "c": 3}),
    (f2, (1, 2, 3), {}), (f2, (1, 2), {}),
    (f3, (1, 2, 3), {"x": 4}), (f3, (1,), {}), (f3, (), {"a": 1, "y": 2}), (f3, (), {}),
    (f4, (), {"order_id": "o"}), (f4, ("o",), {}), (f4, (), {}),
    (f5, (), {"order_id": "o", "sku": "s"}), (f5, (1,), {}),
]


def python_binding(fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    sig = inspect.signature(fun)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


@pytest.mark.parametrize(("fun", "args", "kwargs"), CALLS)
def test_binding_matches_inspect(fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    binder = KeyBinder("t", lambda a: "k", fun)
    expected = python_binding(fun, args, kwargs)
    if expected is None:
        with pytest.raises(PartitionKeyError, match="does not match its signature"):
            binder.arguments(args, kwargs)
    else:
        assert binder.arguments(args, kwargs) == expected


@pytest.mark.parametrize(("args", "kwargs"), [("ab", {}), ((), ["x"]), (5, None)])
def test_args_and_kwargs_must_be_sequences_and_mappings(args: Any, kwargs: Any) -> None:
    with pytest.raises(PartitionKeyError, match="args must be a list or tuple"):
        KeyBinder("t", lambda a: "k", f1).arguments(args, kwargs)


def f6(order_id: Any, sku: Any, qty: Any = 1, event: Any = None) -> None: ...
def f7(a: Any = 0, /, b: Any = 1, **extra: Any) -> None: ...


ORDER_CALLS: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
    *CALLS,
    (f6, ("o", "s"), {"qty": 2, "event": {}}), (f6, (), {"sku": "s", "order_id": "o"}),
    (f6, ("o",), {"event": 1, "sku": "s"}), (f7, (), {"z": 1, "a": 2, "b": 3}), (f7, (5,), {"a": 1}),
    (f1, [1, 2], {}), (f1, (1, 2), {1: 2}),  # a list of args; a non-str name (no **: refused)
    (f5, (), {1: 2, "x": 3}),
]


@pytest.mark.parametrize(("fun", "args", "kwargs"), ORDER_CALLS)
def test_fast_binding_names_the_arguments_in_the_same_order(
        fun: Callable[..., Any], args: Any, kwargs: dict[Any, Any]) -> None:
    """Key functions may iterate the mapping: the fast path keeps the step-by-step order."""
    fast, slow = KeyBinder("t", lambda a: "k", fun), KeyBinder("t", lambda a: "k", fun)
    object.__setattr__(slow, "_check", None)  # the step-by-step binding only
    try:
        expected = list(slow.arguments(args, kwargs).items())
    except PartitionKeyError as exc:
        with pytest.raises(PartitionKeyError) as raised:
            fast.arguments(args, kwargs)
        assert str(raised.value) == str(exc)
    else:
        assert list(fast.arguments(args, kwargs).items()) == expected
