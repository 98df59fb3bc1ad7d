"""``publish_many``: many task calls, routed as ``apply_async`` routes them, in few broker round trips.

Two phases. **Compose** (no I/O): every call is checked, routed through the app's own Celery
router (so a partitioned task goes through ``PartitionRouter`` exactly as ``apply_async``
sends it), turned into Celery's task message (``app.amqp.create_task_message``) and
serialized. A bad call anywhere raises ``PartitionKeyError`` naming its position, and nothing
is sent. **Send**: the messages go out in order through a kombu ``Producer``, in chunks:

* Redis: kombu's own publish batch (``Producer.batch``), so each message is the exact
  ``LPUSH`` kombu's Redis transport writes, and a chunk is one pipelined round trip;
* RabbitMQ (py-amqp): a channel in publisher-confirm mode; a chunk is published without
  waiting, then its confirms are awaited together;
* any other transport: one ``publish`` per message, as ``apply_async`` does.

A chunk that fails raises ``PublishManyError`` telling which positions the broker confirmed,
which were in the failed round trip (on the broker or not) and which were never sent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from celery import signals
from celery.canvas import Signature
from celery.utils.nodenames import anon_nodename
from celery.utils.quorum_queues import detect_quorum_queues
from celery.utils.time import subtract_datetimes
from dateutil.parser import isoparse  # type: ignore[import-untyped]
from kombu.common import maybe_declare
from kombu.entity import Exchange, Queue, maybe_delivery_mode
from kombu.messaging import Producer
from kombu.serialization import dumps as _kombu_dumps
from kombu.utils.json import JSONEncoder

from .errors import PartitionConfigError, PartitioningError, PartitionKeyError, PublishManyError
from .fastrepr import saferepr

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = ["publish_many", "PublishManyError", "DEFAULT_CHUNK", "SUPPORTED_OPTIONS"]

#: Messages per broker round trip (Redis pipeline, RabbitMQ confirm wait).
DEFAULT_CHUNK: Final = 500

#: Seconds to wait for the publisher confirms of one chunk (RabbitMQ).
CONFIRM_TIMEOUT: Final = 30.0

#: Call options ``publish_many`` sends exactly as ``apply_async`` does. Others (``link``,
#: ``chain``, ``chord``, stamping, ``producer`` ...) need Celery's full path: use apply_async.
SUPPORTED_OPTIONS: Final = frozenset({
    "task_id", "countdown", "eta", "expires", "headers", "ignore_result", "time_limit",
    "soft_time_limit", "shadow", "serializer", "compression", "root_id", "parent_id",
    "retries", "argsrepr", "kwargsrepr", "queue", "exchange", "routing_key", "priority",
    "delivery_mode", "exchange_type", "reply_to", "add_to_parent",
})


@dataclass(slots=True)
class _Outgoing:
    """One composed message, ready for ``Producer.publish``."""

    position: int
    name: str
    task_id: str
    queue: Queue | None
    exchange: str | Exchange
    routing_key: str
    body: Any
    content_type: str
    content_encoding: str
    serializer: str
    compression: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    delivery_mode: Any
    declare: list[Queue]
    retry_policy: dict[str, Any]
    sent_event: dict[str, Any] | None
    raw_body: Any
    result: AsyncResult


class _TaskPlan:
    """What ``apply_async`` reads from a task on every call, read once per batch."""

    __slots__ = ("check_arguments", "dump_pydantic", "exec_options", "result", "shadow_name",
                 "soft_limit_error", "task")

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
        self.exec_options = {k: v for k, v in task._get_exec_options().items() if v is not None}
        self.result = partial(task._get_app().AsyncResult, backend=task.backend, task_name=task.name)


#: Hex digit → the same digit with the RFC 4122 variant bits (10xx) set.
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _uuid4_strings(batch: int = 512) -> Iterator[str]:
    """Random (version 4) UUID strings, as ``celery.utils.uuid()`` makes them, 3x cheaper."""
    while True:
        raw = os.urandom(16 * batch).hex()
        for at in range(0, 32 * batch, 32):
            h = raw[at:at + 32]
            yield f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: kombu's JSON encoder (``kombu.utils.json.dumps`` builds one per call with these defaults).
_JSON: Final = JSONEncoder()


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
        self.repr_maxlevels = conf.task_repr_maxlevels
        self.reply_to = app.thread_oid
        self.origin = anon_nodename()
        self.parent = app.current_worker_task
        self._quorum: bool | None = None
        self._tasks: dict[str, _TaskPlan] = {}
        self._ids = _uuid4_strings()

    def _task(self, name: str) -> _TaskPlan:
        plan = self._tasks.get(name)
        if plan is None:
            task = self.app.tasks.get(name)
            if task is None:
                raise PartitionKeyError(f"unknown task {name!r}; is its module imported?")
            plan = self._tasks[name] = _TaskPlan(task)
        return plan

    def _quorum_queues(self) -> bool:
        if self._quorum is None:
            with self.app.connection_for_write() as conn:
                self._quorum = detect_quorum_queues(self.app, conn.transport.driver_type)[0]
        return self._quorum

    def compose(self, position: int, sig: Any) -> _Outgoing:
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
        if options:
            pop = options.pop
            task_id = pop("task_id", None)
            countdown, eta, retries = pop("countdown", None), pop("eta", None), pop("retries", 0)
            root_id, parent_id = pop("root_id", None), pop("parent_id", None)
            reply_to, add_to_parent = pop("reply_to", None), pop("add_to_parent", True)
            time_limit, soft_time_limit = pop("time_limit", None), pop("soft_time_limit", None)
            expires, ignore_result = pop("expires", None), pop("ignore_result", task.ignore_result)
            argsrepr, kwargsrepr = pop("argsrepr", None), pop("kwargsrepr", None)
        else:  # the common call: no options at all
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
        properties.update(options)
        qname = queue
        if queue is None and exchange is None:
            queue = self.default_queue
        if queue is not None:
            if isinstance(queue, str):
                qname, queue = queue, self.queues[queue]
            else:
                qname = queue.name
        if delivery_mode is None:
            delivery_mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None)
            delivery_mode = delivery_mode or self.default_delivery_mode
        if exchange_type is None:
            exchange_type = getattr(getattr(queue, "exchange", None), "type", "direct")
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", qname
        elif exchange is None:
            assert queue is not None
            exchange = queue.exchange.name or self.default_exchange
            routing_key = routing_key or queue.routing_key or self.default_rkey
        if exchange_type == "fanout" or getattr(getattr(queue, "exchange", None), "type", "") == "fanout":
            raise PartitionKeyError(
                f"task {name}: broadcast (fanout) queues are not batched; use apply_async")
        # Serialized now, so an unserializable call fails before anything is sent.
        content_type, content_encoding, data = _serialize(body, serializer)
        result = plan.result(task_id)  # what Task.AsyncResult(task_id) returns
        result.ignored = ignore_result
        if add_to_parent and parent:
            parent.add_trail(result)
        return _Outgoing(
            position=position, name=name, task_id=task_id, queue=queue, exchange=exchange,
            routing_key=routing_key, body=data, content_type=content_type,
            content_encoding=content_encoding, serializer=serializer, compression=compression,
            headers=headers2,
            properties=properties, delivery_mode=delivery_mode,
            declare=[queue] if queue is not None else [], retry_policy=self.default_policy,
            sent_event=sent_event, raw_body=body, result=result,
        )


def _compose_all(app: Celery, signatures: Sequence[Any]) -> list[_Outgoing]:
    composer = _Composer(app)
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


def _serialize(body: Any, serializer: str) -> tuple[str, str, Any]:
    """kombu's serialization, as ``Producer.publish`` does it: (content type, encoding, data)."""
    return _kombu_dumps(body, serializer=serializer)  # type: ignore[no-any-return,no-untyped-call]


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


def _chunks(items: Sequence[_Outgoing], size: int) -> Iterator[Sequence[_Outgoing]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _before(msg: _Outgoing) -> None:
    if signals.before_task_publish.receivers:
        signals.before_task_publish.send(
            sender=msg.name, body=msg.raw_body, exchange=msg.exchange, routing_key=msg.routing_key,
            declare=msg.declare, headers=msg.headers, properties=msg.properties,
            retry_policy=msg.retry_policy,
        )
        # Receivers may change the body, headers or properties they are given (as with
        # apply_async, which serializes after the signal): serialize what they left.
        msg.content_type, msg.content_encoding, msg.body = _serialize(msg.raw_body, msg.serializer)


def _after(chunk: Sequence[_Outgoing]) -> None:
    if signals.after_task_publish.receivers:
        for msg in chunk:
            signals.after_task_publish.send(
                sender=msg.name, body=msg.raw_body, headers=msg.headers,
                exchange=msg.exchange, routing_key=msg.routing_key,
            )


def _producer(channel: Any) -> Any:
    return Producer(channel)  # type: ignore[no-untyped-call]


def _publish_one(producer: Any, msg: _Outgoing) -> None:
    producer.publish(
        msg.body, exchange=msg.exchange, routing_key=msg.routing_key,
        content_type=msg.content_type, content_encoding=msg.content_encoding,
        compression=msg.compression, headers=msg.headers, delivery_mode=msg.delivery_mode,
        declare=[], retry=False, **msg.properties,
    )


class _Tracker:
    """Which positions the broker confirmed; builds the error when a round trip fails."""

    def __init__(self, messages: Sequence[_Outgoing]) -> None:
        self.messages = messages
        self.confirmed = 0  # messages[:confirmed] are on the broker

    def failed(self, in_flight: int, exc: BaseException, where: str) -> PublishManyError:
        done = self.confirmed
        positions = [m.position for m in self.messages]
        return PublishManyError(
            f"publish_many: {where} failed ({type(exc).__name__}: {exc}); "
            f"{done} of {len(positions)} published and confirmed, {in_flight} unconfirmed "
            f"(sent in the failed round trip), {len(positions) - done - in_flight} not sent; "
            "see .published, .unconfirmed and .not_sent",
            published=positions[:done], unconfirmed=positions[done:done + in_flight],
            not_sent=positions[done + in_flight:], task_ids=[m.task_id for m in self.messages],
        )


def _declare(producer: Any, messages: Sequence[_Outgoing]) -> None:
    seen: dict[int, Queue] = {}
    for msg in messages:
        for entity in msg.declare:
            seen.setdefault(id(entity), entity)
    for entity in seen.values():
        maybe_declare(  # type: ignore[no-untyped-call]
            entity, producer.channel, retry=True, **messages[0].retry_policy)


def _send_redis(conn: Any, messages: Sequence[_Outgoing], chunk: int, track: _Tracker) -> None:
    channel = conn.default_channel
    producer = _producer(channel)
    _declare(producer, messages)
    if not channel.supports_batch_publish:  # e.g. retry_on_timeout set: a pipeline could replay
        _send_each(producer, messages, track)
    elif all(map(_plain_redis_put, messages)) and channel.body_encoding == "base64":
        _send_redis_pipelined(channel, messages, chunk, track)
    else:
        _send_redis_kombu_batch(producer, messages, chunk, track)


#: The exchange ``Producer.publish`` falls back to for ``exchange=""`` (its delivery mode).
_ANONYMOUS_EXCHANGE: Final = Exchange("")  # type: ignore[no-untyped-call]

#: ``Producer.publish`` parameters a message's properties may carry (Celery passes leftover
#: call options as properties, and ``publish`` binds these by name).
_PUBLISH_PARAMETERS: Final = ("priority", "mandatory", "immediate", "expiration", "timeout",
                              "confirm_timeout")


def _plain_redis_put(msg: _Outgoing) -> bool:
    """Whether kombu's Redis ``_put`` would write this message as one LPUSH on its queue name.

    That is: the anonymous exchange (Celery's way for direct queues), priority 0 (else kombu
    picks a per-priority list), no queue expiry (else kombu adds PEXPIREs), no compression.
    """
    queue = msg.queue
    arguments = getattr(queue, "queue_arguments", None) or {}
    return (msg.exchange == "" and not msg.properties.get("priority") and not msg.compression
            and (queue is None or (getattr(queue, "expires", None) is None and "x-expires" not in arguments)))


def _redis_payload(channel: Any, msg: _Outgoing, ids: Iterator[str]) -> str:
    """The JSON kombu's Redis transport LPUSHes for ``msg``: ``Producer.publish`` (body bytes,
    delivery mode, expiration), ``Channel.prepare_message`` (the envelope) and
    ``basic_publish`` (body encoding, delivery tag and info), in their order."""
    body, content_encoding = msg.body, msg.content_encoding
    if isinstance(body, str):
        content_encoding = content_encoding or "utf-8"
        body = body.encode(content_encoding)
    elif not content_encoding:
        content_encoding = "binary"
    properties = dict(msg.properties)
    named = {name: properties.pop(name) for name in _PUBLISH_PARAMETERS if name in properties}
    properties["delivery_mode"] = maybe_delivery_mode(  # type: ignore[no-untyped-call]
        msg.delivery_mode or _ANONYMOUS_EXCHANGE.delivery_mode)
    if named.get("expiration") is not None:
        properties["expiration"] = str(int(named["expiration"] * 1000))
    message = channel.prepare_message(body, named.get("priority", 0), msg.content_type,
                                      content_encoding, msg.headers, properties)
    message["body"], body_encoding = channel.encode_body(message["body"], channel.body_encoding)
    props = message["properties"]
    props.update(body_encoding=body_encoding, delivery_tag=next(ids))
    props["delivery_info"].update(exchange=msg.exchange, routing_key=msg.routing_key)
    return _JSON.encode(message)  # what kombu.utils.json.dumps does, without a new encoder


def _send_redis_pipelined(channel: Any, messages: Sequence[_Outgoing], chunk: int,
                          track: _Tracker) -> None:
    """One ``MULTI``/``LPUSH``.../``EXEC`` round trip per chunk: a chunk lands whole or not at all.

    The payloads are what kombu's Redis ``_put`` writes (checked against ``apply_async`` in
    the tests); the client is the channel's own (URL, TLS, ``global_keyprefix``), which
    kombu builds without retries, so a failed round trip is never replayed.
    """
    ids = _uuid4_strings()
    with channel.conn_or_acquire() as client:
        for part in _chunks(messages, chunk):
            pipe = client.pipeline(transaction=True)
            try:
                queues: dict[str, list[str]] = {}
                for msg in part:
                    _before(msg)
                    payload = _redis_payload(channel, msg, ids)
                    pushed = queues.get(msg.routing_key)
                    if pushed is None:
                        queues[msg.routing_key] = [payload]
                    else:
                        pushed.append(payload)
                # LPUSH q a b c leaves q exactly as LPUSH q a; LPUSH q b; LPUSH q c would:
                # one command (and one reply) per queue instead of per message.
                for queue, payloads in queues.items():
                    pipe.lpush(queue, *payloads)
            except Exception as exc:
                pipe.reset()
                raise track.failed(0, exc, "building a Redis pipeline") from exc
            try:
                pipe.execute()
            except Exception as exc:
                raise track.failed(len(part), exc, "a Redis MULTI/EXEC round trip") from exc
            finally:
                pipe.reset()
            track.confirmed += len(part)
            _after(part)


def _send_redis_kombu_batch(producer: Any, messages: Sequence[_Outgoing], chunk: int,
                            track: _Tracker) -> None:
    """kombu's own publish batch (priorities, expiring queues, exchanges with bindings)."""
    # A chunk is flushed by us, never by kombu on its own: max_size above any chunk's commands.
    with producer.batch(max_size=chunk * 64 + 64) as batch:
        for part in _chunks(messages, chunk):
            in_flight = 0
            try:
                for msg in part:
                    _before(msg)
                    _publish_one(producer, msg)
                    in_flight += 1
                batch.flush()
            except Exception as exc:
                # kombu's batch only talks to Redis in flush(): before it, nothing was sent.
                sent = in_flight if _flushing(exc) else 0
                raise track.failed(sent, exc, "a Redis pipeline") from exc
            track.confirmed += len(part)
            _after(part)


def _flushing(exc: BaseException) -> bool:
    from kombu.exceptions import BatchPublishError

    return isinstance(exc, BatchPublishError)


def _send_each(producer: Any, messages: Sequence[_Outgoing], track: _Tracker) -> None:
    for msg in messages:
        try:
            _before(msg)
            _publish_one(producer, msg)
        except Exception as exc:
            raise track.failed(1, exc, "a publish") from exc
        track.confirmed += 1
        _after([msg])


class _Confirms:
    """Publisher confirms of one channel: how many messages, from the first, the broker acked."""

    def __init__(self) -> None:
        self.upto = 0  # delivery tags 1..upto are acked
        self._singles: set[int] = set()
        self.nacked: list[int] = []

    def ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.upto = max(self.upto, tag)
        else:
            self._singles.add(tag)
        while self.upto + 1 in self._singles:
            self.upto += 1
            self._singles.discard(self.upto)

    def nack(self, tag: int, multiple: bool) -> None:
        self.nacked.append(tag)


def _send_amqp(conn: Any, messages: Sequence[_Outgoing], chunk: int, track: _Tracker) -> None:
    channel = conn.channel()
    try:
        if getattr(channel.connection, "confirm_publish", False):
            # py-amqp already waits for every message's confirm: one by one.
            _send_each(_producer(channel), messages, track)
            return
        confirms = _Confirms()
        channel.events["basic_ack"].add(confirms.ack)
        channel.events["basic_nack"].add(confirms.nack)
        channel.confirm_select()
        producer = _producer(channel)
        _declare(producer, messages)
        sent = 0  # delivery tags 1..sent went out, in the order of ``messages``
        for part in _chunks(messages, chunk):
            try:
                for msg in part:
                    _before(msg)
                    _publish_one(producer, msg)
                    sent += 1
                deadline = time.monotonic() + CONFIRM_TIMEOUT
                while confirms.upto < sent and not confirms.nacked:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no publisher confirm within {CONFIRM_TIMEOUT:.0f} s")
                    try:
                        conn.drain_events(timeout=min(left, 1.0))
                    except TimeoutError:  # socket.timeout: no frame in this slice
                        continue
                if confirms.nacked:
                    raise RuntimeError(f"the broker refused (nacked) delivery tag(s) {confirms.nacked}")
            except Exception as exc:
                done, track.confirmed = track.confirmed, min(confirms.upto, sent)
                _after(messages[done:track.confirmed])
                raise track.failed(sent - track.confirmed, exc, "a RabbitMQ publish") from exc
            track.confirmed = sent
            _after(part)
    finally:
        with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
            channel.close()  # the connection may be gone: the error raised says so


@contextmanager
def _connection(app: Celery) -> Iterator[Any]:
    with app.pool.acquire(block=True) as conn:
        try:
            yield conn
        except BaseException:
            # A connection that failed mid-batch goes back to the pool reset, not half-used.
            with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
                conn.collect()
            raise


def _send_events(app: Celery, messages: Sequence[_Outgoing]) -> None:
    events = [m for m in messages if m.sent_event is not None]
    if not events:
        return
    with app.events.default_dispatcher() as dispatcher:
        for msg in events:
            fields = dict(msg.sent_event or {})
            fields.update(queue=getattr(msg.queue, "name", None), exchange=getattr(
                msg.exchange, "name", msg.exchange), routing_key=msg.routing_key)
            dispatcher.send("task-sent", **fields)


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
      are connected). Under ``task_always_eager`` every call runs eagerly through
      ``apply_async``, in order.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    sigs = list(signatures)
    if not sigs:
        return []
    app = _app_of(app, sigs)
    if app.conf.task_always_eager:
        return [sig.apply_async() for sig in sigs]
    messages = _compose_all(app, sigs)
    track = _Tracker(messages)
    try:
        with _connection(app) as conn:
            driver = conn.transport.driver_type
            channel_cls = type(conn.default_channel).__module__
            if driver == "redis":
                _send_redis(conn, messages, chunk_size, track)
            elif driver == "amqp" and channel_cls.startswith("kombu.transport.pyamqp"):
                _send_amqp(conn, messages, chunk_size, track)
            else:
                _send_each(_producer(conn.default_channel), messages, track)
    except PublishManyError:
        raise
    except Exception as exc:  # connecting, declaring: before anything was sent
        raise track.failed(0, exc, "connecting to the broker") from exc
    _send_events(app, messages)
    return [m.result for m in messages]
