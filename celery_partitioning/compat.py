"""Every use of a private Celery or kombu member, in one place, checked at worker start.

celery-partitioning needs a few things Celery and kombu do not offer publicly: the function
behind a not-yet-evaluated task proxy (``@app.task`` above ``@partitioned``), the app's task
registry without finalizing the app, and, for the loss-free fetch on Redis, the methods of
kombu's Redis ``Channel`` that send and read ``BRPOP``. Nothing else in the package touches
a private member. :func:`check_worker_internals` runs when a partition worker starts and
fails the start with one message naming the installed versions when any of them is missing
or has changed shape, instead of running without a guarantee.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final

from .errors import PartitionConfigError

__all__ = [
    "REDIS_CHANNEL_MEMBERS",
    "REDIS_CHANNEL_OPTIONAL",
    "check_worker_internals",
    "consumer_strategies",
    "request_warm_stop",
    "stop_requested",
    "deliver",
    "end_poll",
    "held_delivery_tags",
    "kombu_payload",
    "next_queues",
    "proxy_internals",
    "queue_list_name",
    "redis_channel_class",
    "start_poll",
    "reset_annotations",
    "task_exec_options",
    "task_registry",
    "use_transport_for_scheme",
    "c_json_encoder_factory",
    "registered_serializer",
]

#: The private members of ``kombu.transport.redis.Channel`` the loss-free fetch relies on,
#: with what each must be.
REDIS_CHANNEL_MEMBERS: Final = {
    "_brpop_start": "method (self, timeout=None): sends BRPOP",
    "_brpop_read": "method (self, **options): reads the BRPOP reply and delivers it",
    "_q_for_pri": "method (self, queue, pri): the Redis list of a queue's priority",
    "_in_poll": "attribute: the connection a blocking read is pending on",
}
#: Members newer kombu versions have (5.5+: a watchdog for a stuck BRPOP, token re-auth);
#: kept up to date when present, not required.
REDIS_CHANNEL_OPTIONAL: Final = ("_brpop_sent_at", "_flush_brpop_reauth")


def proxy_internals(obj: Any) -> tuple[tuple[Any, ...], Any]:
    """The arguments and the factory of a ``celery.local.Proxy`` (without evaluating it)."""
    args = object.__getattribute__(obj, "_Proxy__args")
    local = object.__getattribute__(obj, "_Proxy__local")
    return tuple(args or ()), local


def task_exec_options(task: Any) -> dict[str, Any]:
    """The publish options a task class declares (queue, priority...), as ``apply_async``
    merges them before it routes."""
    options: dict[str, Any] = task._get_exec_options()
    return options


def reset_annotations(app: Any) -> None:
    """Make the app prepare ``task_annotations`` again (it caches them on first use)."""
    vars(app).pop("annotations", None)


def c_json_encoder_factory() -> Any:
    """The standard library's C JSON encoder factory (what ``json.dumps`` builds each call),
    or None on an interpreter without it."""
    import json.encoder

    return getattr(json.encoder, "c_make_encoder", None)


def registered_serializer(name: str) -> Any:
    """kombu's registry entry for serializer ``name`` (content type, encoding, encoder), or
    None: a program may have registered its own."""
    from kombu.serialization import registry

    encoders: dict[str, Any] = getattr(registry, "_encoders", {})
    return encoders.get(name)


def task_registry(app: Any) -> Any:
    """The app's task registry as it is now; unlike ``app.tasks``, does not finalize the app."""
    return app._tasks


def stop_requested() -> bool:
    """A warm or cold shutdown of this worker process was asked for (Celery's flags)."""
    from celery.worker import state

    return state.should_stop is not None or state.should_terminate is not None


def request_warm_stop() -> None:
    """What Celery's SIGTERM handler does, minus printing: the consume loop stops after the
    current task. Works before Celery has installed that handler too."""
    from celery.worker import state

    if state.should_stop is None:
        state.should_stop = 0


def consumer_strategies(consumer: Any) -> dict[str, Any]:
    """The consumer's task name → message handler (strategy) map, refilled at every start."""
    strategies: dict[str, Any] = consumer.strategies
    return strategies


# -- kombu's Redis channel (the loss-free fetch, worker side) ----------------------------

def redis_channel_class(base: type, name: str, fetch_of: Callable[[Any], Any]) -> type:
    """A subclass of kombu Redis channel class ``base`` whose blocking fetch and unacked record
    go to ``fetch_of(channel)`` (an object with ``start(timeout)``, ``read(**options)`` and
    ``record(message, delivery_tag)``); a channel for which it returns None is kombu's own."""
    from kombu.transport.virtual.base import QoS as VirtualQoS

    base_qos: Any = base.QoS  # type: ignore[attr-defined]
    kombu_start = base._brpop_start  # type: ignore[attr-defined]
    kombu_read = base._brpop_read  # type: ignore[attr-defined]

    def _brpop_start(self: Any, timeout: Any = None) -> None:
        fetch = fetch_of(self)
        if fetch is None:
            kombu_start(self, timeout)
            return
        # kombu >= 5.5 reads the timeout from the transport options; 5.4 used 1 s
        fetch.start(getattr(self, "brpop_timeout", 1) if timeout is None else timeout)

    def _brpop_read(self: Any, **options: Any) -> bool:
        fetch = fetch_of(self)
        if fetch is None:
            return bool(kombu_read(self, **options))
        return bool(fetch.read(**options))

    def append(qos: Any, message: Any, delivery_tag: Any) -> None:
        fetch = fetch_of(qos.channel)
        if fetch is None:
            base_qos.append(qos, message, delivery_tag)
            return
        # kombu's Redis QoS.append (MULTI ZADD HSET EXEC) is the fetch's record
        fetch.record(message, delivery_tag)
        VirtualQoS.append(qos, message, delivery_tag)  # type: ignore[no-untyped-call]

    qos = type(f"{name}QoS", (base_qos,), {"append": append})
    return type(name, (base,), {"_brpop_start": _brpop_start, "_brpop_read": _brpop_read,
                                "QoS": qos})


def kombu_payload(message: Any) -> dict[str, Any] | None:
    """The payload a virtual-transport (Redis) kombu message was made of; None for others."""
    raw = getattr(message, "_raw", None)
    return raw if isinstance(raw, dict) else None


def next_queues(channel: Any) -> list[str]:
    """The queues the channel reads next (kombu's round-robin over its active queues)."""
    queues: list[str] = channel._queue_cycle.consume(len(channel.active_queues))
    return queues


def queue_list_name(channel: Any, queue: str) -> str:
    """The Redis list of ``queue``'s priority 0, with kombu's global key prefix."""
    prefix = getattr(channel, "global_keyprefix", "") or ""
    return prefix + str(channel._q_for_pri(queue, 0))


def start_poll(channel: Any, monotonic_now: float) -> None:
    """Tell kombu's poller a blocking read is pending on the channel's connection."""
    channel._in_poll = channel.client.connection
    if hasattr(channel, "_brpop_sent_at"):  # kombu 5.5+ watches for a stuck read
        channel._brpop_sent_at = monotonic_now


def end_poll(channel: Any) -> None:
    """The blocking read is answered: kombu may use the connection again."""
    channel._in_poll = None
    flush = getattr(channel, "_flush_brpop_reauth", None)  # newer kombu only
    if flush is not None:
        flush()


def deliver(channel: Any, payload: dict[str, Any], queue: str) -> None:
    """Hand a fetched payload to the channel's consumers, as kombu's own read does."""
    channel.connection._deliver(payload, queue)


def held_delivery_tags(qos: Any) -> list[str]:
    """Delivery tags of the messages a channel's QoS holds unacked."""
    delivered = getattr(qos, "_delivered", None)
    try:
        return [str(tag) for tag in list(delivered or ())]
    except RuntimeError:  # changed under us by the consumer: the caller tries again later
        return []


def use_transport_for_scheme(scheme: str, transport: str) -> None:
    """Make kombu resolve URL scheme ``scheme`` to ``transport`` (a dotted path) in this process.

    ``broker_transport`` only applies to the first connection: when a connection is lost,
    kombu's ``Connection.switch`` moves to the next ``;``-separated broker URL and takes the
    transport from its scheme again (for ``sentinel://`` URLs: kombu's own SentinelTransport,
    without the loss-free fetch). A partition worker process registers its transports under
    the schemes instead (``kombu.transport.TRANSPORT_ALIASES``; ``_transport_cache`` forgets
    an earlier resolution).
    """
    from kombu import transport as kombu_transport

    kombu_transport.TRANSPORT_ALIASES[scheme] = transport
    cache: dict[Any, Any] = getattr(kombu_transport, "_transport_cache", {})
    cache.pop(scheme, None)


# -- the start-up check ---------------------------------------------------------------------

def _versions() -> str:
    import celery
    import kombu

    return f"celery {celery.__version__}, kombu {kombu.__version__}"


def _problems_with_redis_channel() -> list[str]:
    try:
        from kombu.transport import redis as kombu_redis
    except ImportError as exc:  # redis-py missing
        return [f"kombu's Redis transport cannot be imported ({exc})"]
    channel = kombu_redis.Channel
    problems = [f"kombu.transport.redis.Channel.{member} ({what})"
                for member, what in REDIS_CHANNEL_MEMBERS.items() if not hasattr(channel, member)]
    for member, wanted in (("_brpop_start", ["self", "timeout"]), ("_q_for_pri", ["self", "queue", "pri"])):
        method = getattr(channel, member, None)
        if method is not None and list(inspect.signature(method).parameters)[:len(wanted)] != wanted:
            problems.append(f"kombu.transport.redis.Channel.{member} takes "
                            f"{list(inspect.signature(method).parameters)}, expected {wanted}")
    if not hasattr(kombu_redis.Channel, "QoS") or not hasattr(kombu_redis.QoS, "append"):
        problems.append("kombu.transport.redis.QoS.append")
    from kombu import transport as kombu_transport
    from kombu.transport import virtual

    if not isinstance(getattr(kombu_transport, "TRANSPORT_ALIASES", None), dict):
        problems.append("kombu.transport.TRANSPORT_ALIASES")
    if not hasattr(virtual.Transport, "_deliver"):
        problems.append("kombu.transport.virtual.Transport._deliver")
    return problems


def _problems_with_celery() -> list[str]:
    from celery import Celery
    from celery.local import Proxy

    problems = []
    proxy = Proxy(lambda: None)
    try:
        proxy_internals(proxy)
    except AttributeError:
        problems.append("celery.local.Proxy's _Proxy__args / _Proxy__local")
    app = Celery("celery-partitioning-compat-check", set_as_current=False)
    if not isinstance(getattr(app, "_tasks", None), dict):
        problems.append("Celery._tasks (the task registry)")
    from celery import Task

    if not callable(getattr(Task, "_get_exec_options", None)):
        problems.append("celery.Task._get_exec_options")
    from celery.worker import state
    from celery.worker.consumer import Consumer

    for flag in ("should_stop", "should_terminate"):
        if not hasattr(state, flag):
            problems.append(f"celery.worker.state.{flag}")
    for hook in ("on_unknown_message", "on_unknown_task", "on_invalid_task", "on_decode_error"):
        if not callable(getattr(Consumer, hook, None)):
            problems.append(f"celery.worker.consumer.Consumer.{hook}")
    return problems


def check_worker_internals(redis_broker: bool) -> None:
    """Fail with ``PartitionConfigError`` if a private member this package uses is gone."""
    problems = _problems_with_celery() + (_problems_with_redis_channel() if redis_broker else [])
    if problems:
        raise PartitionConfigError(
            f"this celery-partitioning cannot run partition workers with {_versions()}: "
            f"{'; '.join(problems)} changed or is missing. Install a supported version "
            "(celery>=5.4,<6 and kombu>=5.4,<6) or upgrade celery-partitioning")
