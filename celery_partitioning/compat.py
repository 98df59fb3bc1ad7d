"""Every use of a private Celery or kombu member, in one place, so that an upgrade that
changes one breaks here and nowhere else.

:func:`check_worker_internals` runs when a partition worker starts, and
:func:`check_publish_internals` when ``publish_many`` is imported: a member that is gone or
changed shape fails the start with one message naming the installed versions, rather than a
worker running without its guarantees.
"""

from __future__ import annotations

import atexit
import inspect
import weakref
from collections.abc import Callable
from typing import Any

from .errors import PartitionConfigError

__all__ = [
    "active_task_ids", "c_json_encoder_factory", "control_handlers", "late_bound_consumer_tracers",
    "check_worker_internals", "clear_exit_handlers", "decode_virtual_body",
    "install_warm_sigint", "kombu_payload", "proxy_internals", "redis_destinations",
    "result_maker", "rewrite_worker_banner", "request_warm_stop", "reset_annotations",
    "run_after_fork_handlers", "run_exit_handlers", "stop_requested", "task_call_hooks",
    "task_exec_options", "stock_json_serializer", "check_publish_internals", "task_registry",
    "terminate_requested", "virtual_message"
]

def clear_exit_handlers() -> None:
    """Forget the ``atexit`` handlers a forked child inherited from its parent (the stdlib
    has no public call for it; multiprocessing's fork children skip them with ``os._exit``)."""
    atexit._clear()


def run_after_fork_handlers() -> None:
    """In a forked child: what multiprocessing runs in its fork children, so the app, its
    control and result backends drop the parent's connection pools (Celery and kombu
    register their cleanups with ``multiprocessing.util.register_after_fork``)."""
    from multiprocessing import util

    getattr(util, "_run_after_forkers")()  # noqa: B009 - not in the stubs


def run_exit_handlers() -> None:
    """Run the ``atexit`` handlers now (a forked child leaves with ``os._exit``)."""
    atexit._run_exitfuncs()


def proxy_internals(obj: Any) -> tuple[tuple[Any, ...], Any]:
    """The arguments and the factory of a ``celery.local.Proxy`` (without evaluating it)."""
    args = object.__getattribute__(obj, "_Proxy__args")
    local = object.__getattribute__(obj, "_Proxy__local")
    return tuple(args or ()), local


def task_exec_options(task: Any) -> dict[str, Any]:
    """The publish options a task class declares (queue, priority...), as ``apply_async``
    merges them before it routes."""
    return dict(task._get_exec_options())


def reset_annotations(app: Any) -> None:
    """Make the app prepare ``task_annotations`` again (it caches them on first use)."""
    vars(app).pop("annotations", None)


def c_json_encoder_factory() -> Any:
    """The standard library's C JSON encoder factory (``json.dumps`` builds one per call)."""
    import json.encoder

    return getattr(json.encoder, "c_make_encoder", None)


def stock_json_serializer() -> bool:
    """Whether kombu's ``json`` serializer is its own ``dumps`` (a program may register one)."""
    from kombu.serialization import registry
    from kombu.utils.json import dumps

    codec = registry._encoders.get("json")
    return codec is not None and tuple(codec) == ("application/json", "utf-8", dumps)


def task_call_hooks(task: Any) -> tuple[Any, Any, Any]:
    """What ``Task.apply_async`` calls on a task before it sends: (the argument check or None,
    a custom ``shadow_name`` or None, the pydantic argument dump or None)."""
    from celery.app.task import Task

    custom = getattr(type(task), "shadow_name", None) is not Task.shadow_name
    return (getattr(task, "__header__", None) if task.typing else None,
            task.shadow_name if custom else None,  # the default one returns None
            getattr(task, "_dump_pydantic_arguments", None))  # Celery 5.5+


def redis_destinations(channel: Any, exchange: str, routing_key: str,
                       priority: int) -> tuple[list[str], dict[str, int]]:
    """Where kombu's Redis transport puts a message (``basic_publish`` → the exchange's queues
    → ``_put``): the lists it ``LPUSH``es to, and the lists it ``PEXPIRE``s (ms) after."""
    if not hasattr(channel, "_q_for_pri") or not hasattr(channel, "priority_steps"):
        raise PartitionConfigError(f"publish_many cannot batch on Redis with {_versions()}: "
                                   "kombu's Redis Channel._q_for_pri/priority_steps are missing")
    priority = channel._get_message_priority({"properties": {"priority": priority}})
    expires = getattr(channel, "_expires", None) or {}  # kombu 5.5+: x-expires queues
    pushes, expiring = [], {}
    for queue in channel._lookup(exchange, routing_key):
        pushes.append(channel._q_for_pri(queue, priority))
        if expires.get(queue):
            expiring.update({channel._q_for_pri(queue, p): expires[queue]
                             for p in channel.priority_steps})
    return pushes, expiring


class _OnReady:
    """``AsyncResult.on_ready`` made on first use: that vine promise of a weak method is ten
    objects, most of what a result costs."""

    def __init__(self, promise: type) -> None:
        self.promise = promise

    def __get__(self, result: Any, owner: Any = None) -> Any:
        if result is None:
            return self
        # setdefault: two threads asking at once get the same promise.
        return vars(result).setdefault("on_ready", self.promise(result._on_fulfilled, weak=True))


#: id of a result class → its subclass with a lazy ``on_ready`` (same name; pickles as the
#: class). Weak values: a subclass (and the class, an app's) lives while results of it do.
_LAZY_CLASSES: weakref.WeakValueDictionary[int, type] = weakref.WeakValueDictionary()

#: What ``AsyncResult.__init__`` sets (Celery 5.7, and 5.x before it): a prototype with others
#: means results are made the usual way.
_RESULT_ATTRIBUTES = frozenset({"app", "id", "backend", "parent", "on_ready", "_cache", "_ignored"})


def result_maker(make: Callable[[str], Any]) -> Callable[[str], Any]:
    """``make`` (``app.AsyncResult`` with its backend bound), made cheaper for many results.

    A prototype made by ``make`` gives the attributes; each result is a copy of them with its
    own id, of a subclass that makes ``on_ready`` on first use. Falls back to ``make`` when
    the prototype is not what Celery's ``__init__`` is known to build.
    """
    prototype = make("prototype")
    state = dict(vars(prototype))
    cls = type(prototype)
    if (state.keys() != _RESULT_ATTRIBUTES or state["id"] != "prototype"
            or state["parent"] is not None or hasattr(cls, "on_ready")
            or getattr(state["on_ready"], "weak", None) is not True):
        return make
    promise = type(state.pop("on_ready"))
    del state["id"]
    lazy = _LAZY_CLASSES.get(id(cls))
    if lazy is None or lazy.__bases__ != (cls,):
        lazy = _LAZY_CLASSES[id(cls)] = type(cls.__name__, (cls,), {
            "on_ready": _OnReady(promise), "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    new = object.__new__

    def made(task_id: str) -> Any:
        result: Any = new(lazy)
        attributes = vars(result)
        attributes.update(state)
        attributes["id"] = task_id
        return result

    return made


def task_registry(app: Any) -> Any:
    """The app's task registry as it is now; unlike ``app.tasks``, does not finalize the app."""
    return app._tasks


def stop_requested() -> bool:
    """A warm or cold shutdown of this worker process was asked for (Celery's flags)."""
    from celery.worker import state

    return state.should_stop is not None or state.should_terminate is not None


def terminate_requested() -> bool:
    """A cold shutdown was asked for (a second signal): do not wait for running tasks."""
    from celery.worker import state

    return state.should_terminate is not None


def request_warm_stop() -> None:
    """What Celery's SIGTERM handler does, minus printing: the consume loop stops after the
    current task. Works before Celery has installed that handler too."""
    from celery.worker import state

    if state.should_stop is None:
        state.should_stop = 0


def install_warm_sigint(worker: Any) -> None:
    """A first SIGINT (Ctrl-C) is the warm shutdown SIGTERM is, exiting 0 (Celery's exits 1);
    a second is still cold. Call it in the main thread after Celery installed its handlers."""
    from celery.apps import worker as apps_worker

    apps_worker._shutdown_handler(worker, sig="SIGINT", how="Warm",
                                  callback=apps_worker.on_SIGINT, exitcode=0)


def rewrite_worker_banner(worker: Any, rewrite: Callable[[str], str], extra: str) -> None:
    """Have ``worker``'s banner show ``rewrite(startup_info)``, then ``extra`` after its
    ``[tasks]`` list, on this instance only. Best effort: nothing depends on a banner."""
    startup_info = getattr(worker, "startup_info", None)
    extra_info = getattr(worker, "extra_info", None)
    if not callable(startup_info) or not callable(extra_info):
        return

    def rewritten(*args: Any, **kwargs: Any) -> Any:
        text = startup_info(*args, **kwargs)
        return rewrite(text) if isinstance(text, str) else text

    def with_extra(*args: Any, **kwargs: Any) -> Any:
        text = extra_info(*args, **kwargs)
        return (text or "") + extra if text is None or isinstance(text, str) else text

    worker.startup_info = rewritten
    worker.extra_info = with_extra


def virtual_message(payload: dict[str, Any], channel: Any) -> Any:
    """A kombu message (as kombu's Redis transport delivers it) made of a raw payload; acks go
    to ``channel`` (``basic_ack``/``basic_reject``/``decode_body``)."""
    from kombu.transport.virtual.base import Message

    return Message(payload, channel=channel)


def decode_virtual_body(body: Any, encoding: Any) -> Any:
    """What kombu's virtual channel does to a stored body (base64 unless stated otherwise)."""
    from kombu.transport.virtual.base import Channel

    if encoding and str(encoding).lower() != "utf-8":
        return Channel.codecs[encoding].decode(body)
    return body


def kombu_payload(message: Any) -> dict[str, Any] | None:
    """The payload a virtual-transport (Redis) kombu message was made of; None for others."""
    raw = getattr(message, "_raw", None)
    return raw if isinstance(raw, dict) else None


def control_handlers() -> dict[str, Any]:
    """Celery's process-wide registry of remote control handlers (``Panel.data``: command and
    alias name → handler), which a worker's mailbox dispatches from."""
    from celery.worker.control import Panel

    handlers = Panel.data
    if not isinstance(handlers, dict) or not callable(handlers.get("add_consumer")):
        raise PartitionConfigError(
            f"this celery-partitioning cannot guard Celery's remote control with {_versions()}: "
            "celery.worker.control.Panel.data changed or is missing. Install a supported "
            "version (celery>=5.4,<6) or upgrade celery-partitioning")
    return handlers


def active_task_ids() -> set[str]:
    """The ids of the tasks running in this worker process now."""
    from celery.worker import state

    return {request.id for request in list(state.active_requests)}


def _current_build_tracer(*args: Any, **kwargs: Any) -> Any:
    from celery.app import trace

    return trace.build_tracer(*args, **kwargs)


def late_bound_consumer_tracers() -> None:
    """Have Celery's consumer look ``celery.app.trace.build_tracer`` up each time: the supervisor
    preloads the consumer module, whose ``from ... import`` bound the original before an SDK
    (Sentry) patched it in ``worker_init``; that SDK would see no task."""
    from celery.worker.consumer import consumer

    consumer.build_tracer = _current_build_tracer


# -- the start-up check ---------------------------------------------------------------------

def _versions() -> str:
    import celery
    import kombu

    return f"celery {celery.__version__}, kombu {kombu.__version__}"


def _problems_with_kombu() -> list[str]:
    from kombu.transport.virtual import base

    problems = []
    if not isinstance(getattr(base.Channel, "codecs", None), dict) or \
            "base64" not in base.Channel.codecs:
        problems.append("kombu.transport.virtual.base.Channel.codecs['base64']")
    if "channel" not in inspect.signature(base.Message).parameters:
        problems.append("kombu.transport.virtual.base.Message(payload, channel=...)")
    return problems


def _problems_with_celery() -> list[str]:
    from celery import Celery, Task
    from celery.apps import worker as apps_worker
    from celery.local import Proxy
    from celery.worker import control, state
    from celery.worker.consumer import consumer

    problems = []
    try:
        proxy_internals(Proxy(lambda: None))
    except AttributeError:
        problems.append("celery.local.Proxy's _Proxy__args / _Proxy__local")
    app = Celery("celery-partitioning-compat-check", set_as_current=False)
    if not isinstance(getattr(app, "_tasks", None), dict):
        problems.append("Celery._tasks (the task registry)")
    if not callable(getattr(Task, "_get_exec_options", None)):
        problems.append("celery.Task._get_exec_options")
    problems += [f"celery.worker.state.{flag}" for flag in ("should_stop", "should_terminate")
                 if not hasattr(state, flag)]
    if not callable(getattr(consumer, "build_tracer", None)):
        problems.append("celery.worker.consumer.consumer.build_tracer (how the consumer builds "
                        "tracers)")
    if not isinstance(getattr(control.Panel, "data", None), dict) or \
            not hasattr(state, "active_requests"):
        problems.append("celery.worker.control.Panel.data and celery.worker.state.active_requests "
                        "(remote control)")
    if not callable(getattr(Task, "start_strategy", None)):
        problems.append("celery.Task.start_strategy (the message handler a worker uses)")
    handler = getattr(apps_worker, "_shutdown_handler", None)
    if (not callable(handler) or not callable(getattr(apps_worker, "on_SIGINT", None))
            or not {"sig", "how", "callback", "exitcode"} <= set(inspect.signature(handler).parameters)):
        problems.append("celery.apps.worker._shutdown_handler(worker, sig, how, callback, "
                        "exitcode) and on_SIGINT (the Ctrl-C handler)")
    return problems


def _fail_on(problems: list[str], what: str) -> None:
    if problems:
        raise PartitionConfigError(
            f"this celery-partitioning cannot {what} with {_versions()}: "
            f"{'; '.join(problems)} changed or is missing. Install a supported version "
            "(celery>=5.4,<6 and kombu>=5.4,<6) or upgrade celery-partitioning")


def check_worker_internals() -> None:
    """Fail with ``PartitionConfigError`` if a private member this package uses is gone."""
    _fail_on(_problems_with_celery() + _problems_with_kombu(), "run partition workers")


def check_publish_internals() -> None:
    """Fail with ``PartitionConfigError`` if a member ``publish_many`` uses is gone (the Redis
    channel's own are checked when it is used: importing it loads redis)."""
    from celery import Task
    from celery.app.amqp import AMQP
    from kombu.serialization import registry
    from kombu.transport.virtual.base import Channel

    wanted = {"reply_to", "ignore_result", "argsrepr", "kwargsrepr", "origin", "root_id",
              "parent_id", "shadow", "time_limit", "soft_time_limit", "create_sent_event"}
    problems = [what for what, ok in (
        ("kombu's virtual Channel._get_message_priority/_lookup",
         hasattr(Channel, "_get_message_priority") and hasattr(Channel, "_lookup")),
        ("kombu.serialization.registry._encoders",
         isinstance(getattr(registry, "_encoders", None), dict)),
        ("celery.Task._get_exec_options/shadow_name", hasattr(Task, "_get_exec_options")
         and hasattr(Task, "shadow_name")),
        ("AMQP.as_task_v2's parameters", wanted <= set(inspect.signature(AMQP.as_task_v2).parameters)),
    ) if not ok]
    _fail_on(problems, "publish_many")
