"""What Celery's ``Task.retry`` computes, for a retry that happens in place: the arguments of
the next attempt (merged exactly as Celery merges them), the delay, and the changed arguments
serialized as the task's messages are (so an attempt record can carry them through a crash).
Pure functions; ``retry.py`` uses them.
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

__all__ = ["retry_arguments", "encode_call", "decode_call", "delay_of"]


def retry_arguments(run: Callable[..., Any], current_args: Any, current_kwargs: Any,
                    args: Any, kwargs: Any) -> tuple[Any, Any]:
    """The arguments of the next attempt, merged exactly as Celery's ``Task.retry`` does.

    Neither given: the current ones. Both given: those. Only ``args`` given: they replace the
    positional arguments and the current keyword arguments stay, except those the new positional
    ones now fill. Only ``kwargs`` given: they replace the current values of the same names,
    positional ones included (celery/celery#6494). Pure.
    """
    current_args = () if current_args is None else current_args
    current_kwargs = {} if current_kwargs is None else current_kwargs
    if not ((args is not None and kwargs is None and current_kwargs)
            or (kwargs is not None and args is None and current_args)):
        return (current_args if args is None else args,
                current_kwargs if kwargs is None else kwargs)
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError):
        return (current_args if args is None else args,
                current_kwargs if kwargs is None else kwargs)
    if args is not None:
        positional = [p for p in signature.parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                    inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        merged = dict(current_kwargs)
        for parameter in positional[:len(args)]:
            if parameter.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD:
                merged.pop(parameter.name, None)
        return args, merged
    try:
        bound = signature.bind_partial(*current_args)
    except TypeError:
        return current_args, kwargs
    rest = dict(kwargs or {})
    for name in list(rest):
        if (name in bound.arguments
                and signature.parameters[name].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD):
            bound.arguments[name] = rest.pop(name)
    return bound.args, {**bound.kwargs, **rest}


def encode_call(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    """Arguments a retry changed, serialized as the task's messages are (for the attempt record)."""
    from kombu import serialization

    dumps: Callable[..., tuple[str, str, bytes | str]] = serialization.dumps
    serializer = getattr(task, "serializer", None) or task.app.conf.task_serializer
    content_type, encoding, body = dumps([list(args), kwargs], serializer=serializer)
    raw = body if isinstance(body, bytes) else body.encode(encoding)
    return {"content_type": content_type, "encoding": encoding,
            "body": base64.b64encode(raw).decode("ascii")}


def decode_call(call: dict[str, str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from kombu import serialization

    loads: Callable[..., Any] = serialization.loads
    args, kwargs = loads(base64.b64decode(call["body"]), call["content_type"], call["encoding"],
                         accept={call["content_type"]})
    return tuple(args), dict(kwargs)


def delay_of(app: Any, eta: Any, countdown: Any) -> float:
    if eta is not None:
        if isinstance(eta, datetime):
            from celery.utils.time import maybe_make_aware

            aware = maybe_make_aware(eta, app.timezone)
            return max(0.0, float((aware - app.now()).total_seconds()))
        raise TypeError(f"eta must be a datetime, got {eta!r}")
    if countdown is None:
        return 0.0
    if isinstance(countdown, timedelta):
        return max(0.0, countdown.total_seconds())
    return max(0.0, float(countdown))
