"""The parts of one ``publish_many`` call: a signature checked and split, and the options
``send_task`` takes out of it before a message is made (``publish.py`` makes the message)."""

from __future__ import annotations

from typing import Any, Final

from celery.canvas import Signature

from .errors import PartitionKeyError

__all__ = ["SUPPORTED_OPTIONS", "SendOptions", "send_options", "signature_parts"]

#: Call options ``publish_many`` sends exactly as ``apply_async`` does. Others (``link``,
#: ``chain``, ``chord``, stamping, ``producer`` ...) need Celery's full path: use apply_async.
SUPPORTED_OPTIONS: Final = frozenset({
    "task_id", "countdown", "eta", "expires", "headers", "ignore_result", "time_limit",
    "soft_time_limit", "shadow", "serializer", "compression", "root_id", "parent_id",
    "retries", "argsrepr", "kwargsrepr", "queue", "exchange", "routing_key", "priority",
    "delivery_mode", "exchange_type", "reply_to", "add_to_parent",
})

#: The options ``Celery.send_task`` takes out of a call's options before routing.
SEND_TASK_OPTIONS: Final = frozenset({
    "task_id", "countdown", "eta", "retries", "root_id", "parent_id", "reply_to", "add_to_parent",
    "time_limit", "soft_time_limit", "expires", "ignore_result", "argsrepr", "kwargsrepr",
})


def signature_parts(sig: Any) -> tuple[str, dict[str, Any]]:
    """The task name and a copy of the options of a single task call; anything else refused."""
    # A Signature is a dict: read its fields directly (its properties cost a call each).
    if not isinstance(sig, Signature) or sig.get("subtask_type") is not None:
        kind = getattr(sig, "subtask_type", None) or type(sig).__name__
        raise PartitionKeyError(
            f"not a single task call ({kind}); publish_many takes task signatures such as "
            "task.s(...); send a canvas (chain, group, chord) with apply_async"
        )
    name = sig["task"]
    options = sig.get("options")
    options = dict(options) if options else {}
    if options and not SUPPORTED_OPTIONS.issuperset(options):
        unsupported = sorted(set(options) - SUPPORTED_OPTIONS)
        raise PartitionKeyError(
            f"task {name}: publish_many does not send the option(s) {', '.join(unsupported)}; "
            "publish this call with apply_async"
        )
    return str(name), options


class SendOptions:
    """What ``send_task`` takes out of a call's options before making the message (class
    attributes are the defaults: the common call sets only its task id)."""

    task_id: Any = None
    countdown: Any = None
    eta: Any = None
    retries: Any = 0
    root_id: Any = None
    parent_id: Any = None
    reply_to: Any = None
    add_to_parent: Any = True
    time_limit: Any = None
    soft_time_limit: Any = None
    expires: Any = None
    argsrepr: Any = None
    kwargsrepr: Any = None

    def __init__(self, ignore_result: bool) -> None:
        self.ignore_result: Any = ignore_result


def send_options(options: dict[str, Any], ignore_result: bool) -> SendOptions:
    """Pop ``send_task``'s options off ``options`` (the common call has none of them)."""
    call = SendOptions(ignore_result)
    if not SEND_TASK_OPTIONS.isdisjoint(options):
        for name in SEND_TASK_OPTIONS.intersection(options):
            setattr(call, name, options.pop(name))
    return call
