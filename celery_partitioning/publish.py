"""``publish_many``: many task calls, each made into the message ``apply_async`` sends, in few
broker round trips. ``_Composer.compose`` takes the steps of ``Task.apply_async`` →
``Celery.send_task`` → ``AMQP.send_task_message`` without I/O, so every call is checked, routed
and serialized before ``delivery.deliver`` sends the first one."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from functools import cached_property, partial
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final

from celery import current_app
from celery.canvas import Signature
from celery.utils.nodenames import anon_nodename
from celery.utils.time import maybe_make_aware
from dateutil.parser import isoparse  # type: ignore[import-untyped]

from . import compat
from .delivery import Outgoing, Template, deliver, serialize, uuid4_strings
from .errors import PartitionConfigError, PartitioningError, PartitionKeyError, PublishManyError
from .fastrepr import saferepr

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = ["publish_many", "PublishManyError", "DEFAULT_CHUNK", "SUPPORTED_OPTIONS"]

compat.check_publish_internals()

#: Messages per broker round trip (Redis pipeline, RabbitMQ confirm wait).
DEFAULT_CHUNK: Final = 500

#: The options ``Celery.send_task`` takes out of a call's options before routing.
_SEND_TASK_OPTIONS: Final = frozenset({
    "task_id", "countdown", "eta", "retries", "root_id", "parent_id", "reply_to", "add_to_parent",
    "time_limit", "soft_time_limit", "expires", "ignore_result", "argsrepr", "kwargsrepr"})
#: Call options sent exactly as ``apply_async`` sends them. Others (``link``, ``chain``,
#: ``chord``, stamping, ``producer`` ...) need Celery's full path: use apply_async.
SUPPORTED_OPTIONS: Final = _SEND_TASK_OPTIONS | {
    "headers", "shadow", "serializer", "compression", "queue", "exchange", "routing_key",
    "priority", "delivery_mode", "exchange_type"}
#: The settings a batch reads, once: each ``app.conf`` read walks a chain of dicts.
_SETTINGS: Final = ("task_send_sent_event", "task_inherit_parent_priority", "task_serializer",
                    "task_compression", "task_default_delivery_mode", "task_default_routing_key")


class _Task:
    """What ``apply_async`` reads from a task on every call, read once per batch."""

    def __init__(self, task: Any, composer: _Composer) -> None:
        if task.soft_time_limit and task.time_limit and task.soft_time_limit > task.time_limit:
            raise ValueError("soft_time_limit must be less than or equal to time_limit")
        self.task = task
        self.check_arguments, self.shadow_name, self.dump_pydantic = compat.task_call_hooks(task)
        # None means "not set" all the way down (router, message, publish): left out.
        self.exec_options = {k: v for k, v in compat.task_exec_options(task).items() if v is not None}
        self.result = compat.result_maker(  # what Task.AsyncResult(task_id) returns
            partial(task.app.AsyncResult, backend=task.backend, task_name=task.name))
        self.template = None if composer.conf.task_send_sent_event else Template.build(
            composer.amqp, task, composer.reply_to, composer.origin)


class _Composer:
    """Makes the messages of one batch."""

    def __init__(self, app: Celery) -> None:
        self.app, self.amqp = app, app.amqp
        self.conf = SimpleNamespace(**{name: app.conf[name] for name in _SETTINGS})
        self.reply_to, self.origin = app.thread_oid, anon_nodename()
        self.parent = app.current_worker_task
        self.repr_maxlevels = int(app.conf.get("task_repr_maxlevels", 3))  # Celery 5.5+
        self.tasks: dict[str, _Task] = {}
        self.ids = uuid4_strings()
        self.stock_json = compat.stock_json_serializer()  # else a program registered its own json
        self.trails: list[int] = []  # positions whose results join the calling task's trail

    def _apply_async(self, sig: Any) -> tuple[_Task, Any, Any, dict[str, Any], Any]:
        """``Task.apply_async``'s steps: (the task, args, kwargs, options, shadow)."""
        if not isinstance(sig, Signature) or sig.get("subtask_type") is not None:
            kind = getattr(sig, "subtask_type", None) or type(sig).__name__
            raise PartitionKeyError(f"not a single task call ({kind}); publish_many takes task "
                                    "signatures such as task.s(...); send a canvas with apply_async")
        name, options = str(sig["task"]), dict(sig.get("options") or {})
        if not SUPPORTED_OPTIONS.issuperset(options):
            raise PartitionKeyError(f"task {name}: publish_many does not send the option(s) "
                                    f"{', '.join(sorted(set(options) - SUPPORTED_OPTIONS))}; use apply_async")
        if name not in self.tasks:
            if name not in self.app.tasks:
                raise PartitionKeyError(f"unknown task {name!r}; is its module imported?")
            self.tasks[name] = _Task(self.app.tasks[name], self)
        plan, args, kwargs = self.tasks[name], sig.get("args"), sig.get("kwargs") or {}
        args = () if args is None else args
        if plan.check_arguments is not None:
            plan.check_arguments(*args, **kwargs)
        shadow = options.pop("shadow", None)
        if not shadow and plan.shadow_name is not None:
            shadow = plan.shadow_name(args, kwargs, options)
        options = dict(plan.exec_options, **options)
        if plan.dump_pydantic is not None and options.get("serializer") != "pickle":
            args, kwargs = plan.dump_pydantic(args, kwargs)
        return plan, args, kwargs, options, shadow

    def compose(self, position: int, sig: Any) -> Outgoing:
        """One call's message, without sending it."""
        plan, args, kwargs, options, shadow = self._apply_async(sig)
        task, parent, name = plan.task, self.parent, plan.task.name
        # --- Celery.send_task
        call = {k: options.pop(k) for k in _SEND_TASK_OPTIONS.intersection(options)}
        task_id = call.pop("task_id", None) or next(self.ids)
        argsrepr, kwargsrepr = call.pop("argsrepr", None), call.pop("kwargsrepr", None)
        if call.pop("add_to_parent", True) and parent:
            self.trails.append(position)  # added to the parent's trail once published
        options = self.amqp.router.route(options, name, args, kwargs, task)
        if (call.get("eta") or call.get("countdown")) and self.quorum_queues:
            raise PartitionKeyError(f"task {name}: countdown/eta with quorum queues needs Celery's "
                                    "native delayed delivery; publish this call with apply_async")
        expires = call.get("expires")  # seconds, a datetime or an ISO string; naive times are UTC
        if expires is not None:
            if isinstance(expires, str):
                expires = isoparse(expires)
            if isinstance(expires, datetime):
                expires = (maybe_make_aware(expires) - maybe_make_aware(self.app.now())).total_seconds()
            options["expiration"] = max(float(expires), 0.0)  # Celery too sends a past time as 0
        if parent and (not call.get("root_id") or not call.get("parent_id")):
            call["root_id"] = call.get("root_id") or parent.request.root_id or parent.request.id
            call["parent_id"] = call.get("parent_id") or parent.request.id
            if self.conf.task_inherit_parent_priority:
                options.setdefault("priority", parent.request.delivery_info.get("priority"))
        if argsrepr is None:
            argsrepr = saferepr(args, self.amqp.argsrepr_maxsize, maxlevels=self.repr_maxlevels)
        if kwargsrepr is None:
            kwargsrepr = saferepr(kwargs, self.amqp.kwargsrepr_maxsize, maxlevels=self.repr_maxlevels)
        ignore_result = call.get("ignore_result", task.ignore_result)
        template, sent_event = plan.template, None
        if (template is not None and not call and not shadow and type(task_id) is str
                and type(argsrepr) is str and type(kwargsrepr) is str):
            headers, properties, body = template.message(task_id, args, kwargs, argsrepr, kwargsrepr)
        else:
            template = None
            headers, properties, body, sent_event = self.amqp.create_task_message(
                task_id, name, args, kwargs, create_sent_event=self.conf.task_send_sent_event,
                shadow=shadow, argsrepr=argsrepr, kwargsrepr=kwargsrepr, origin=self.origin, **{
                    **call, "ignore_result": ignore_result,
                    "reply_to": call.get("reply_to") or self.reply_to}, **options)
        # --- AMQP.send_task_message
        queue, exchange, routing_key, delivery_mode = self._destination(name, options)
        serializer = options.pop("serializer", None) or self.conf.task_serializer
        extra = options.pop("headers", None)
        if extra:
            headers.update(extra)
            if template is not None and not template.headers.keys().isdisjoint(extra):
                template = None  # the call overrides one of Celery's headers
        compression = options.pop("compression", None) or self.conf.task_compression
        properties.update(options)
        # Serialized now, so an unserializable call fails before anything is sent.
        content_type, content_encoding, data = serialize(body, serializer, self.stock_json)
        return Outgoing(
            name, task_id, queue, exchange, routing_key, delivery_mode, headers, properties, body,
            data, content_type, content_encoding, serializer, compression, sent_event,
            ignore_result, template, extra)

    @cached_property
    def quorum_queues(self) -> bool:
        """Quorum queues on RabbitMQ: Celery (5.5+) sends a countdown by native delayed delivery."""
        with self.app.connection_for_write() as conn:
            rabbitmq = conn.transport.driver_type == "amqp"
        return rabbitmq and any((q.queue_arguments or {}).get("x-queue-type") == "quorum"
                                for q in self.amqp.queues.values())

    def _destination(self, name: str, options: dict[str, Any]) -> tuple[Any, str, str, Any]:
        """(queue, exchange name, routing key, delivery mode) as ``send_task_message`` picks
        them, popped off ``options``."""
        queue, exchange, routing_key, exchange_type, delivery_mode = map(options.pop, (
            "queue", "exchange", "routing_key", "exchange_type", "delivery_mode"), (None,) * 5)
        if queue is None and exchange is None:
            queue = self.amqp.default_queue
        qname, queue = ((queue, self.amqp.queues[queue]) if isinstance(queue, str)
                        else (getattr(queue, "name", None), queue))
        queue_exchange = getattr(queue, "exchange", None)
        if delivery_mode is None:
            delivery_mode = (getattr(queue_exchange, "delivery_mode", None)
                             or self.conf.task_default_delivery_mode)
        queue_type = getattr(queue_exchange, "type", "direct")
        exchange_type = exchange_type or queue_type
        if "fanout" in (exchange_type, queue_type):
            raise PartitionKeyError(f"task {name}: broadcast (fanout) queues need apply_async")
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", qname
        elif exchange is None:
            exchange = queue.exchange.name or self.amqp.default_exchange
            routing_key = routing_key or queue.routing_key or self.conf.task_default_routing_key
        return queue, getattr(exchange, "name", exchange), routing_key, delivery_mode

    def result(self, msg: Outgoing) -> AsyncResult:
        made = self.tasks[msg.name].result(msg.task_id)
        made.ignored = msg.ignore_result
        return made


def publish_many(
    signatures: Iterable[Any], *, app: Celery | None = None, chunk_size: int = DEFAULT_CHUNK
) -> list[AsyncResult]:
    """Publish task calls as ``apply_async`` would, in order, ``chunk_size`` per broker round
    trip; one ``AsyncResult`` per call. A bad call anywhere raises ``PartitionKeyError`` naming
    its position, and nothing is published; a broker failure raises ``PublishManyError`` with
    the positions ``published``, ``unconfirmed`` and ``not_sent`` (docs/reference.md)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    sigs = list(signatures)
    if not sigs:
        return []
    if app is None:
        app = next((a for sig in sigs if (a := getattr(sig, "_app", None)) is not None),
                   current_app._get_current_object())
    composer, messages = _Composer(app), []
    for position, sig in enumerate(sigs):  # every call checked first, in eager mode too
        try:
            messages.append(composer.compose(position, sig))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, PartitioningError) else f"{type(exc).__name__}: {exc}"
            error = PartitionConfigError if isinstance(exc, PartitionConfigError) else PartitionKeyError
            raise error(f"publish_many: call {position} ({getattr(sig, 'task', '?')}): {reason}"
                        + ("" if "nothing was published" in reason else "; nothing was published")) from exc
    if app.conf.task_always_eager:
        return [sig.apply_async() for sig in sigs]
    published = 0
    try:
        deliver(app, messages, chunk_size, dict(app.conf.task_publish_retry_policy or {}))
        published = len(messages)
    except PublishManyError as exc:
        published = len(exc.published)
        raise
    finally:  # results made after sending: lighter while a batch is sent
        results = [composer.result(msg) for msg in messages[:published]]
        for position in composer.trails:
            if position < published:
                composer.parent.add_trail(results[position])
    return results
