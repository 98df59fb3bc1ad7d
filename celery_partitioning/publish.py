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

from celery.canvas import Signature
from celery.utils.nodenames import anon_nodename
from dateutil.parser import isoparse  # type: ignore[import-untyped]

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

#: Call options ``publish_many`` sends exactly as ``apply_async`` does. Others (``link``,
#: ``chain``, ``chord``, stamping, ``producer`` ...) need Celery's full path: use apply_async.
SUPPORTED_OPTIONS: Final = frozenset({
    "task_id", "countdown", "eta", "expires", "headers", "ignore_result", "time_limit",
    "soft_time_limit", "shadow", "serializer", "compression", "root_id", "parent_id",
    "retries", "argsrepr", "kwargsrepr", "queue", "exchange", "routing_key", "priority",
    "delivery_mode", "exchange_type", "reply_to", "add_to_parent",
})


#: The options ``Celery.send_task`` takes out of a call's options before routing.
_SEND_TASK_OPTIONS: Final = frozenset({
    "task_id", "countdown", "eta", "retries", "root_id", "parent_id", "reply_to", "add_to_parent",
    "time_limit", "soft_time_limit", "expires", "ignore_result", "argsrepr", "kwargsrepr",
})


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
        if not _SEND_TASK_OPTIONS.isdisjoint(options):
            pop = options.pop
            task_id = pop("task_id", None)
            countdown, eta, retries = pop("countdown", None), pop("eta", None), pop("retries", 0)
            root_id, parent_id = pop("root_id", None), pop("parent_id", None)
            reply_to, add_to_parent = pop("reply_to", None), pop("add_to_parent", True)
            time_limit, soft_time_limit = pop("time_limit", None), pop("soft_time_limit", None)
            expires, ignore_result = pop("expires", None), pop("ignore_result", task.ignore_result)
            argsrepr, kwargsrepr = pop("argsrepr", None), pop("kwargsrepr", None)
        else:  # the common call: none of those options
            task_id = countdown = eta = root_id = parent_id = reply_to = time_limit = None
            soft_time_limit = expires = argsrepr = kwargsrepr = None
            retries, add_to_parent, ignore_result = 0, True, task.ignore_result
        task_id = task_id or next(self._ids)
        options = self.router.route(options, name, args, kwargs, task)
        if (eta or countdown) and self._quorum_queues():
            raise PartitionKeyError(
                f"task {name}: countdown/eta with quorum queues needs Celery's native delayed "
                "delivery; publish this call with apply_async"
            )
        if expires is not None:
            if isinstance(expires, datetime):
                expires_s = subtract_datetimes(expires, self.app.now()).total_seconds()
            elif isinstance(expires, str):
                expires_s = subtract_datetimes(isoparse(expires), self.app.now()).total_seconds()
            else:
                expires_s = expires
            options["expiration"] = max(expires_s, 0)  # Celery warns, then sends 0 too
        parent = self.parent
        if parent and (not root_id or not parent_id):
            root_id = root_id or parent.request.root_id or parent.request.id
            parent_id = parent_id or parent.request.id
            if self.inherit_priority:
                options.setdefault("priority", parent.request.delivery_info.get("priority"))
        if argsrepr is None:
            argsrepr = saferepr(args, self.argsrepr_maxsize, maxlevels=self.repr_maxlevels)
        if kwargsrepr is None:
            kwargsrepr = saferepr(kwargs, self.kwargsrepr_maxsize, maxlevels=self.repr_maxlevels)
        # A call whose message only differs from the task's template by id, arguments, reprs.
        plain = (countdown is None and eta is None and expires is None and not retries
                 and root_id is None and parent_id is None and reply_to is None
                 and time_limit is None and soft_time_limit is None and not shadow
                 and ignore_result == task.ignore_result and type(task_id) is str
                 and type(argsrepr) is str and type(kwargsrepr) is str)
        template = plan.template(self) if plain else None
        if template is not None:
            headers2, properties, body, sent_event = template.message(
                task_id, args, kwargs, argsrepr, kwargsrepr)
        else:
            headers2, properties, body, sent_event = self.amqp.create_task_message(
                task_id, name, args, kwargs, countdown, eta, None, None, expires, retries, None,
                None, None, reply_to or self.reply_to, time_limit, soft_time_limit,
                self.send_sent_event, root_id, parent_id, shadow, None,
                ignore_result=ignore_result, argsrepr=argsrepr, kwargsrepr=kwargsrepr,
                origin=self.origin, **options,
            )
        # --- AMQP.send_task_message
        queue = options.pop("queue", None)
        exchange = options.pop("exchange", None)
        routing_key = options.pop("routing_key", None)
        exchange_type = options.pop("exchange_type", None)
        delivery_mode = options.pop("delivery_mode", None)
        serializer = options.pop("serializer", None) or self.default_serializer
        compression = options.pop("compression", None) or self.default_compressor
        headers = options.pop("headers", None)
        if headers:
            headers2.update(headers)
        header_json = None
        if template is not None and (not headers or template.header_json.keys.isdisjoint(headers)):
            header_json = template.header_json  # the headers are the template's, then the router's
        properties.update(options)
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
        # Serialized now, so an unserializable call fails before anything is sent.
        content_type, content_encoding, data = self.codec.serialize(body, serializer)
        if add_to_parent and parent:
            self.trails.append(position)  # added to the parent's trail once published
        return Outgoing(
            position=position, name=name, task_id=task_id, queue=queue, exchange=exchange,
            routing_key=routing_key, body=data, content_type=content_type,
            content_encoding=content_encoding, serializer=serializer, compression=compression,
            headers=headers2,
            properties=properties, delivery_mode=delivery_mode,
            retry_policy=self.default_policy, sent_event=sent_event, raw_body=body,
            ignore_result=ignore_result, header_json=header_json, extra_headers=headers,
            shared=template.mutable if template is not None else None,
        )

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
