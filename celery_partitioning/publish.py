"""``publish_many``: many task calls, routed as ``apply_async`` routes them, in few broker round trips.

Two phases. **Compose** (no I/O): every call is checked, routed through the app's own Celery
router (so a partitioned task goes through ``PartitionRouter`` exactly as ``apply_async``
sends it), turned into Celery's task message (``app.amqp.create_task_message``) and
serialized. A bad call anywhere raises ``PartitionKeyError`` naming its position, and nothing
is sent. **Send** (``sending.py``): the messages go out in order, a chunk per round trip
(Redis ``MULTI``/``EXEC``, RabbitMQ publisher confirms), and a failed round trip raises
``PublishManyError`` telling which positions the broker confirmed, which were in the failed
round trip (on the broker or not) and which were never sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from celery.utils.nodenames import anon_nodename
from dateutil.parser import isoparse  # type: ignore[import-untyped]

from .call_parts import SUPPORTED_OPTIONS, SendOptions, send_options, signature_parts
from .compat import result_maker, task_exec_options
from .errors import PartitionConfigError, PartitioningError, PartitionKeyError, PublishManyError
from .fastrepr import saferepr
from .payload import JSONCodec, MessageTemplate, Outgoing, subtract_datetimes, uuid4_strings
from .sending import send

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = ["publish_many", "PublishManyError", "DEFAULT_CHUNK", "SUPPORTED_OPTIONS"]

#: Messages per broker round trip (Redis pipeline, RabbitMQ confirm wait).
DEFAULT_CHUNK: Final = 500

class _TaskPlan:
    """What ``apply_async`` reads from a task on every call, read once per batch."""

    __slots__ = ("_template", "check_arguments", "dump_pydantic", "exec_options", "result",
                 "shadow_name", "soft_limit_error", "task")

    def __init__(self, task: Any) -> None:
        from celery.app.task import Task

        self.task = task
        self.soft_limit_error = bool(task.soft_time_limit and task.time_limit
                                     and task.soft_time_limit > task.time_limit)
        self.check_arguments = getattr(task, "__header__", None) if task.typing else None
        custom = getattr(type(task), "shadow_name", None) is not Task.shadow_name
        self.shadow_name = task.shadow_name if custom else None  # the default returns None
        self.dump_pydantic = getattr(task, "_dump_pydantic_arguments", None)
        # None means "not set" all the way down (router, message, publish): leave those out.
        self.exec_options = {k: v for k, v in task_exec_options(task).items() if v is not None}
        self.result = result_maker(  # what Task.AsyncResult(task_id) returns
            partial(task.app.AsyncResult, backend=task.backend, task_name=task.name))
        self._template: MessageTemplate | bool | None = False  # False: not built yet

    def template(self, composer: _Composer) -> MessageTemplate | None:
        """The task's message template for calls without options (None: Celery's each time)."""
        if self._template is False:
            self._template = None if composer.send_sent_event else MessageTemplate.build(
                composer.amqp, self.task, composer.reply_to, composer.origin)
        return self._template  # type: ignore[return-value]


class _Composer:
    """Builds messages the way ``Task.apply_async`` → ``Celery.send_task`` → ``send_task_message``
    does (celery/app/task.py, base.py, amqp.py), with the app's settings read once per batch.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        conf = app.conf
        amqp = app.amqp
        self.amqp = amqp
        self.router = amqp.router
        self.queues = amqp.queues
        self.default_queue = amqp.default_queue
        self.default_exchange = amqp.default_exchange
        self.default_rkey = conf.task_default_routing_key
        self.default_delivery_mode = conf.task_default_delivery_mode
        self.default_serializer = conf.task_serializer
        self.default_compressor = conf.task_compression
        self.default_policy = dict(conf.task_publish_retry_policy or {})
        self.send_sent_event = conf.task_send_sent_event
        self.inherit_priority = conf.task_inherit_parent_priority
        self.argsrepr_maxsize = amqp.argsrepr_maxsize
        self.kwargsrepr_maxsize = amqp.kwargsrepr_maxsize
        # Celery 5.5+ (before it, saferepr's own default: 3 levels)
        self.repr_maxlevels = int(conf.get("task_repr_maxlevels", 3))
        self.reply_to = app.thread_oid
        self.origin = anon_nodename()
        self.parent = app.current_worker_task
        self._quorum: bool | None = None
        self._plans: dict[str, _TaskPlan] = {}
        self._exchanges: dict[int, tuple[Any, Any, str]] = {}
        self._ids = uuid4_strings()
        self.codec = JSONCodec()
        #: Positions whose results join the calling task's trail (``add_to_parent``).
        self.trails: list[int] = []

    def _task(self, name: str) -> _TaskPlan:
        plan = self._plans.get(name)
        if plan is None:
            task = self.app.tasks.get(name)
            if task is None:
                raise PartitionKeyError(f"unknown task {name!r}; is its module imported?")
            plan = self._plans[name] = _TaskPlan(task)
        return plan

    def _exchange_of(self, queue: Any) -> tuple[Any, str]:
        """The delivery mode (or None) and type of ``queue``'s exchange, read once per queue."""
        facts = self._exchanges.get(id(queue))
        if facts is None or facts[0] is not queue:
            exchange = getattr(queue, "exchange", None)
            facts = self._exchanges[id(queue)] = (
                queue, getattr(exchange, "delivery_mode", None), getattr(exchange, "type", "direct"))
        return facts[1], facts[2]

    def _quorum_queues(self) -> bool:
        """Whether the app declares quorum queues on RabbitMQ (as Celery 5.5+ checks before it
        turns a countdown into native delayed delivery); read here, Celery 5.4 has no helper."""
        if self._quorum is None:
            with self.app.connection_for_write() as conn:
                rabbitmq = conn.transport.driver_type == "amqp"
            queues = self.app.amqp.queues
            self._quorum = rabbitmq and any(
                (queues[name].queue_arguments or {}).get("x-queue-type") == "quorum"
                for name in queues)
        return self._quorum

    def compose(self, position: int, sig: Any) -> Outgoing:
        """One call's message, made as ``apply_async`` → ``send_task`` → ``send_task_message``
        would make it (each step marked), without sending it."""
        name, options = signature_parts(sig)
        plan = self._task(name)
        task = plan.task
        args, kwargs = sig.get("args"), sig.get("kwargs")  # as apply_async passes them: no copies
        args = () if args is None else args
        kwargs = {} if kwargs is None else kwargs
        # --- Task.apply_async
        if plan.soft_limit_error:
            raise ValueError("soft_time_limit must be less than or equal to time_limit")
        if plan.check_arguments is not None:
            plan.check_arguments(*args, **kwargs)
        shadow = options.pop("shadow", None)
        if not shadow and plan.shadow_name is not None:
            shadow = plan.shadow_name(args, kwargs, options)
        options = dict(plan.exec_options, **options) if options else dict(plan.exec_options)
        dump_pydantic = plan.dump_pydantic
        if dump_pydantic is not None and options.get("serializer") != "pickle":
            args, kwargs = dump_pydantic(args, kwargs)
        # --- Celery.send_task
        call = send_options(options, task.ignore_result)
        call.task_id = call.task_id or next(self._ids)
        options = self.router.route(options, name, args, kwargs, task)
        if (call.eta or call.countdown) and self._quorum_queues():
            raise PartitionKeyError(
                f"task {name}: countdown/eta with quorum queues needs Celery's native delayed "
                "delivery; publish this call with apply_async"
            )
        if call.expires is not None:
            options["expiration"] = self._expiration(call.expires)
        parent = self.parent
        if parent and (not call.root_id or not call.parent_id):
            call.root_id = call.root_id or parent.request.root_id or parent.request.id
            call.parent_id = call.parent_id or parent.request.id
            if self.inherit_priority:
                options.setdefault("priority", parent.request.delivery_info.get("priority"))
        if call.argsrepr is None:
            call.argsrepr = saferepr(args, self.argsrepr_maxsize, maxlevels=self.repr_maxlevels)
        if call.kwargsrepr is None:
            call.kwargsrepr = saferepr(kwargs, self.kwargsrepr_maxsize,
                                       maxlevels=self.repr_maxlevels)
        template, (headers2, properties, body, sent_event) = self._message(
            plan, call, name=name, args=args, kwargs=kwargs, shadow=shadow, options=options)
        # --- AMQP.send_task_message
        queue, exchange, routing_key, delivery_mode = self._destination(name, options)
        serializer = options.pop("serializer", None) or self.default_serializer
        compression = options.pop("compression", None) or self.default_compressor
        headers = options.pop("headers", None)
        if headers:
            headers2.update(headers)
        header_json = None
        if template is not None and (not headers or template.header_json.keys.isdisjoint(headers)):
            header_json = template.header_json  # the headers are the template's, then the router's
        properties.update(options)
        # Serialized now, so an unserializable call fails before anything is sent.
        content_type, content_encoding, data = self.codec.serialize(body, serializer)
        if call.add_to_parent and parent:
            self.trails.append(position)  # added to the parent's trail once published
        return Outgoing(
            position=position, name=name, task_id=call.task_id, queue=queue, exchange=exchange,
            routing_key=routing_key, body=data, content_type=content_type,
            content_encoding=content_encoding, serializer=serializer, compression=compression,
            headers=headers2,
            properties=properties, delivery_mode=delivery_mode,
            retry_policy=self.default_policy, sent_event=sent_event, raw_body=body,
            ignore_result=call.ignore_result, header_json=header_json, extra_headers=headers,
            shared=template.mutable if template is not None else None,
        )

    def _message(self, plan: _TaskPlan, call: SendOptions, *, name: str, args: Any,
                 kwargs: Any, shadow: Any, options: dict[str, Any]) -> tuple[Any, Any]:
        """(the template used or None, Celery's (headers, properties, body, sent event)): a
        call whose message differs from the task's template only by id, arguments and reprs
        copies the template; any other goes through ``amqp.create_task_message``."""
        task = plan.task
        plain = (call.countdown is None and call.eta is None and call.expires is None
                 and not call.retries and call.root_id is None and call.parent_id is None
                 and call.reply_to is None and call.time_limit is None
                 and call.soft_time_limit is None and not shadow
                 and call.ignore_result == task.ignore_result and type(call.task_id) is str
                 and type(call.argsrepr) is str and type(call.kwargsrepr) is str)
        template = plan.template(self) if plain else None
        if template is not None:
            return template, template.message(call.task_id, args, kwargs, call.argsrepr,
                                              call.kwargsrepr)
        return None, self.amqp.create_task_message(
            call.task_id, name, args, kwargs, call.countdown, call.eta, None, None, call.expires,
            call.retries, None, None, None, call.reply_to or self.reply_to, call.time_limit,
            call.soft_time_limit, self.send_sent_event, call.root_id, call.parent_id, shadow, None,
            ignore_result=call.ignore_result, argsrepr=call.argsrepr, kwargsrepr=call.kwargsrepr,
            origin=self.origin, **options,
        )

    def _expiration(self, expires: Any) -> float:
        """Seconds to ``expires`` (a datetime, an ISO string or seconds), as Celery computes
        the message's expiration (it warns on a past time, then sends 0 too)."""
        if isinstance(expires, datetime):
            seconds = subtract_datetimes(expires, self.app.now()).total_seconds()
        elif isinstance(expires, str):
            seconds = subtract_datetimes(isoparse(expires), self.app.now()).total_seconds()
        else:
            seconds = expires
        return max(seconds, 0)

    def _destination(self, name: str, options: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
        """(queue, exchange, routing key, delivery mode) as ``send_task_message`` decides them,
        popped off ``options``."""
        queue, exchange = options.pop("queue", None), options.pop("exchange", None)
        routing_key, exchange_type = options.pop("routing_key", None), options.pop("exchange_type", None)
        delivery_mode = options.pop("delivery_mode", None)
        qname = queue
        if queue is None and exchange is None:
            queue = self.default_queue
        if queue is not None:
            if isinstance(queue, str):
                qname, queue = queue, self.queues[queue]
            else:
                qname = queue.name
        queue_mode, queue_type = self._exchange_of(queue)
        if delivery_mode is None:
            delivery_mode = queue_mode or self.default_delivery_mode
        if exchange_type is None:
            exchange_type = queue_type
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", qname
        elif exchange is None:
            assert queue is not None
            exchange = queue.exchange.name or self.default_exchange
            routing_key = routing_key or queue.routing_key or self.default_rkey
        if exchange_type == "fanout" or queue_type == "fanout":
            raise PartitionKeyError(
                f"task {name}: broadcast (fanout) queues are not batched; use apply_async")
        return queue, exchange, routing_key, delivery_mode

    def result(self, msg: Outgoing) -> AsyncResult:
        """What ``Task.AsyncResult(task_id)`` returns for a sent message (made after sending:
        a batch's messages are then lighter to keep while it is composed and sent)."""
        result = self._plans[msg.name].result(msg.task_id)
        result.ignored = msg.ignore_result
        return result


def _compose_all(app: Celery, signatures: Sequence[Any],
                 composer: _Composer | None = None) -> list[Outgoing]:
    composer = composer if composer is not None else _Composer(app)
    out = []
    for position, sig in enumerate(signatures):
        try:
            out.append(composer.compose(position, sig))
        except PartitionConfigError as exc:
            raise PartitionConfigError(
                f"publish_many: call {position}: {exc}; nothing was published") from exc
        except Exception as exc:
            name = getattr(sig, "task", None) or "?"
            reason = str(exc) if isinstance(exc, PartitioningError) else f"{type(exc).__name__}: {exc}"
            raise PartitionKeyError(
                f"publish_many: call {position} ({name}): {reason}"
                + ("" if "nothing was published" in reason else "; nothing was published")
            ) from exc
    return out


def _app_of(app: Celery | None, signatures: Sequence[Any]) -> Celery:
    if app is not None:
        return app
    for sig in signatures:
        found = getattr(sig, "_app", None)
        if found is not None:
            return found
        task = getattr(sig, "_type", None)
        found = getattr(task, "_app", None)
        if found is not None:
            return found
    from celery import current_app

    return current_app._get_current_object()


def publish_many(
    signatures: Iterable[Any], *, app: Celery | None = None, chunk_size: int = DEFAULT_CHUNK
) -> list[AsyncResult]:
    """Publish many task calls as ``apply_async`` would, in as few broker round trips as possible.

    ``signatures``: task signatures (``task.s(...)``, ``task.signature(...)``), partitioned
    or not, each routed by the app's Celery router exactly as its ``apply_async`` would be
    (partitioned tasks through ``PartitionRouter``: same key, checks, headers and queue).
    Returns one ``AsyncResult`` per call, in order.

    * A bad call (bad key, forbidden or unsupported option, wrong arguments, unknown task,
      unserializable arguments) raises ``PartitionKeyError`` naming its position; then
      nothing was published.
    * Messages are sent in the given order (so in order within each queue), ``chunk_size``
      per round trip. A broker failure raises ``PublishManyError`` with the positions
      ``published``, ``unconfirmed`` and ``not_sent``.
    * ``before_task_publish`` fires for each message before its chunk is sent;
      ``after_task_publish`` after the broker confirmed the chunk (only when receivers
      are connected). Under ``task_always_eager`` every call is checked as above first,
      then each runs eagerly through its ``apply_async``, in order.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    sigs = list(signatures)
    if not sigs:
        return []
    app = _app_of(app, sigs)
    composer = _Composer(app)
    messages = _compose_all(app, sigs, composer)  # every check first, in eager mode too
    if app.conf.task_always_eager:
        return [sig.apply_async() for sig in sigs]
    try:
        send(app, messages, chunk_size)
    except PublishManyError as exc:
        _add_trails(composer, messages, set(exc.published))
        raise
    results = list(map(composer.result, messages))
    _add_trails(composer, messages, None, results)
    return results


def _add_trails(composer: _Composer, messages: Sequence[Outgoing], only: set[int] | None,
                results: Sequence[AsyncResult] | None = None) -> None:
    """Inside a task: the published calls' results join its trail, as apply_async's do."""
    for position in composer.trails:
        if only is None or position in only:
            composer.parent.add_trail(
                results[position] if results is not None else composer.result(messages[position]))

