"""Sending composed task messages to the broker in chunks, and saying exactly what arrived.

``publish_many`` (``publish.py``) composes every message first; this module sends them in order:

* Redis: one ``MULTI``/``LPUSH``.../``EXEC`` round trip per chunk, with the payload kombu's
  Redis transport writes (or kombu's own publish batch for what that fast path does not cover);
* RabbitMQ (py-amqp): a channel in publisher-confirm mode, the confirms of a chunk awaited
  together;
* any other transport: one ``Producer.publish`` per message.

Every sender keeps a ``_Tracker`` of the positions the broker confirmed, so a failure becomes a
``PublishManyError`` with ``published``, ``unconfirmed`` and ``not_sent``.
"""

from __future__ import annotations

import json.encoder
import os
import re
import time
from base64 import b64encode
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from typing import TYPE_CHECKING, Any, Final

from celery import signals
from kombu.common import maybe_declare
from kombu.entity import Exchange, Queue, maybe_delivery_mode
from kombu.exceptions import EncodeError
from kombu.messaging import Producer
from kombu.serialization import dumps as _kombu_dumps
from kombu.serialization import registry as serialization_registry
from kombu.utils.json import JSONEncoder
from kombu.utils.json import dumps as kombu_json_dumps

from .errors import PublishManyError

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = ["Outgoing", "HeaderJSON", "JSONCodec", "send", "serialize", "uuid4_strings", "CONFIRM_TIMEOUT"]

#: Seconds to wait for the publisher confirms of one chunk (RabbitMQ).
CONFIRM_TIMEOUT: Final = 30.0


@dataclass(slots=True)
class Outgoing:
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
    #: Set when the headers are a task template's plus ``extra_headers`` (see ``HeaderJSON``).
    header_json: HeaderJSON | None = None
    extra_headers: dict[str, Any] | None = None


class HeaderJSON:
    """The JSON of a task template's headers, pre-encoded around the fields that vary.

    ``_JSON.encode`` of the template's headers with a marker in each varying field, split
    at the markers: a message's headers JSON is then the pieces joined with its own id and
    reprs, plus the headers the router added. Same bytes as encoding the whole dict (the
    same encoder produced the pieces), a quarter of the work.
    """

    __slots__ = ("fields", "keys", "pieces")

    def __init__(self, headers: dict[str, Any], varying: Sequence[str]) -> None:
        marked = dict(headers)
        for name in varying:
            marked[name] = f"\x00{name}\x00"
        text = _JSON.encode(marked)
        assert text.endswith("}")
        split = re.split('"\\\\u0000(' + "|".join(map(re.escape, varying)) + ')\\\\u0000"',
                         text[:-1])
        self.pieces = split[0::2]
        self.fields = split[1::2]
        self.keys = frozenset(headers)

    def encode(self, headers: dict[str, Any], extra: dict[str, Any] | None,
               codec: JSONCodec) -> str:
        pieces, out = self.pieces, [self.pieces[0]]
        for index, name in enumerate(self.fields, 1):
            out.append(_quote(headers[name]))
            out.append(pieces[index])
        if extra:
            out.append(", ")
            out.append(codec.encode(extra)[1:-1])
        out.append("}")
        return "".join(out)


#: Hex digit → the same digit with the RFC 4122 variant bits (10xx) set.
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def uuid4_strings(batch: int = 512) -> Iterator[str]:
    """Random (version 4) UUID strings, as ``celery.utils.uuid()`` makes them, 3x cheaper."""
    while True:
        raw = os.urandom(16 * batch).hex()
        for at in range(0, 32 * batch, 32):
            h = raw[at:at + 32]
            yield f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: kombu's JSON encoder (``kombu.utils.json.dumps`` builds one per call with these defaults).
_JSON: Final = JSONEncoder()


def serialize(body: Any, serializer: str) -> tuple[str, str, Any]:
    """kombu's serialization, as ``Producer.publish`` does it: (content type, encoding, data)."""
    return _kombu_dumps(body, serializer=serializer)  # type: ignore[no-any-return,no-untyped-call]


class JSONCodec:
    """kombu's JSON, with the encoder built once per batch instead of once per call.

    ``kombu.utils.json.dumps`` (so ``json.dumps``) builds a new encoder object for every
    value: that costs more than encoding a small dict. This builds the same C encoder the
    standard library would (kombu's ``default``, ASCII output, ``", "`` and ``": "``) and
    reuses it, so the output is the same bytes. One per batch and thread: its circular
    reference markers are per encoder.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        make = getattr(json.encoder, "c_make_encoder", None)
        self._encoder = None if make is None else make(
            {}, _JSON.default, _quote, None, ": ", ", ", False, False, True)

    def encode(self, value: Any) -> str:
        if self._encoder is None:
            return _JSON.encode(value)
        try:
            return "".join(self._encoder(value, 0))
        except BaseException:
            self._reset()  # its markers may keep the failed value's containers
            raise

    def serialize(self, body: Any, serializer: str) -> tuple[str, str, Any]:
        """``serialize``, with this encoder while kombu's registry maps json to its own."""
        if serializer == "json" and _stock_json():
            try:
                return "application/json", "utf-8", self.encode(body)
            except Exception as exc:  # what kombu's registry raises for an unserializable body
                raise EncodeError(exc) from exc
        return serialize(body, serializer)


def _stock_json() -> bool:
    """Whether kombu's registry still maps ``json`` to ``kombu.utils.json.dumps`` (a program
    may register its own)."""
    codec = getattr(serialization_registry, "_encoders", {}).get("json")
    return codec is not None and tuple(codec) == (
        "application/json", "utf-8", kombu_json_dumps)


def _chunks(items: Sequence[Outgoing], size: int) -> Iterator[Sequence[Outgoing]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _before(msg: Outgoing) -> None:
    if signals.before_task_publish.receivers:
        signals.before_task_publish.send(
            sender=msg.name, body=msg.raw_body, exchange=msg.exchange, routing_key=msg.routing_key,
            declare=msg.declare, headers=msg.headers, properties=msg.properties,
            retry_policy=msg.retry_policy,
        )
        # Receivers may change the body, headers or properties they are given (as with
        # apply_async, which serializes after the signal): serialize what they left.
        msg.content_type, msg.content_encoding, msg.body = serialize(msg.raw_body, msg.serializer)


def _after(chunk: Sequence[Outgoing]) -> None:
    if signals.after_task_publish.receivers:
        for msg in chunk:
            signals.after_task_publish.send(
                sender=msg.name, body=msg.raw_body, headers=msg.headers,
                exchange=msg.exchange, routing_key=msg.routing_key,
            )


def _producer(channel: Any) -> Any:
    return Producer(channel)  # type: ignore[no-untyped-call]


def _publish_one(producer: Any, msg: Outgoing) -> None:
    producer.publish(
        msg.body, exchange=msg.exchange, routing_key=msg.routing_key,
        content_type=msg.content_type, content_encoding=msg.content_encoding,
        compression=msg.compression, headers=msg.headers, delivery_mode=msg.delivery_mode,
        declare=[], retry=False, **msg.properties,
    )


class _Tracker:
    """Which positions the broker confirmed; builds the error when a round trip fails."""

    def __init__(self, messages: Sequence[Outgoing]) -> None:
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


def _declare(producer: Any, messages: Sequence[Outgoing]) -> None:
    """Declare each queue of the batch once per connection, as ``apply_async`` does (through
    kombu's ``maybe_declare`` and the connection's cache of declared entities)."""
    seen: dict[int, Queue] = {}
    for msg in messages:
        for entity in msg.declare:
            seen.setdefault(id(entity), entity)
    declared = producer.channel.connection.client.declared_entities
    for entity in seen.values():
        if entity.can_cache_declaration and hash(entity) in declared:
            continue  # what maybe_declare would find, without binding a copy of the queue first
        maybe_declare(  # type: ignore[no-untyped-call]
            entity, producer.channel, retry=True, **messages[0].retry_policy)


def _send_redis(conn: Any, messages: Sequence[Outgoing], chunk: int, track: _Tracker) -> None:
    channel = conn.default_channel
    producer = _producer(channel)
    _declare(producer, messages)
    if not channel.supports_batch_publish:  # e.g. retry_on_timeout set: a pipeline could replay
        _send_each(producer, messages, track)
    elif all(map(_plain_redis_put, messages)) and channel.body_encoding == "base64":
        _send_redis_pipelined(channel, messages, chunk, track)
    else:
        _send_redis_kombu_batch(producer, messages, chunk, track)


#: ``Producer.publish`` parameters a message's properties may carry (Celery passes leftover
#: call options as properties, and ``publish`` binds these by name).
_PUBLISH_PARAMETERS: Final = frozenset({"priority", "mandatory", "immediate", "expiration",
                                        "timeout", "confirm_timeout"})


def _plain_redis_put(msg: Outgoing) -> bool:
    """Whether kombu's Redis ``_put`` would write this message as one LPUSH on its queue name.

    That is: the anonymous exchange (Celery's way for direct queues), priority 0 (else kombu
    picks a per-priority list), no queue expiry (else kombu adds PEXPIREs), no compression.
    """
    queue = msg.queue
    arguments = getattr(queue, "queue_arguments", None) or {}
    return (msg.exchange == "" and not msg.properties.get("priority") and not msg.compression
            and (queue is None or (getattr(queue, "expires", None) is None and "x-expires" not in arguments)))


def _redis_payload(msg: Outgoing, ids: Iterator[str], default_priority: int,
                   codec: JSONCodec) -> str:
    """The JSON kombu's Redis transport LPUSHes for ``msg`` (a ``_plain_redis_put`` one).

    What ``Producer.publish`` (body bytes, delivery mode, expiration),
    ``Channel.prepare_message`` (the envelope) and ``Channel.basic_publish`` (base64 body,
    delivery tag and info) build, in their order; ``tests/test_publish_many.py`` compares
    it with what ``apply_async`` writes, key order included.
    """
    body, content_encoding = msg.body, msg.content_encoding
    if type(body) is str:
        content_encoding = content_encoding or "utf-8"
        body = body.encode(content_encoding)
    elif not content_encoding:
        content_encoding = "binary"
    properties = msg.properties.copy()
    expiration = None
    if not _PUBLISH_PARAMETERS.isdisjoint(properties):
        for name in _PUBLISH_PARAMETERS.intersection(properties):
            value = properties.pop(name)
            if name == "expiration":
                expiration = value
    properties["delivery_mode"] = maybe_delivery_mode(msg.delivery_mode)  # type: ignore[no-untyped-call]
    if expiration is not None:
        properties["expiration"] = str(int(expiration * 1000))
    info = properties.setdefault("delivery_info", {})
    properties.setdefault("priority", default_priority)
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = next(ids)
    info["exchange"], info["routing_key"] = msg.exchange, msg.routing_key
    if msg.header_json is None or signals.before_task_publish.receivers:
        return codec.encode({  # what kombu.utils.json.dumps does
            "body": b64encode(body).decode(), "content-encoding": content_encoding,
            "content-type": msg.content_type, "headers": msg.headers or {},
            "properties": properties,
        })
    # The same bytes, with the headers from their pre-encoded template (base64 needs no escapes).
    return "".join((
        '{"body": "', b64encode(body).decode(), '", "content-encoding": ', _quote(content_encoding),
        ', "content-type": ', _quote(msg.content_type), ', "headers": ',
        msg.header_json.encode(msg.headers, msg.extra_headers, codec), ', "properties": ',
        codec.encode(properties), "}",
    ))


def _send_redis_pipelined(channel: Any, messages: Sequence[Outgoing], chunk: int,
                          track: _Tracker) -> None:
    """One ``MULTI``/``LPUSH``.../``EXEC`` round trip per chunk: a chunk lands whole or not at all.

    The payloads are what kombu's Redis ``_put`` writes (checked against ``apply_async`` in
    the tests); the client is the channel's own (URL, TLS, ``global_keyprefix``), which
    kombu builds without retries, so a failed round trip is never replayed.
    """
    ids = uuid4_strings()
    default_priority = channel.default_priority
    codec = JSONCodec()
    client = channel.client  # the channel's own publishing client (kombu's cached one)
    for part in _chunks(messages, chunk):
        pipe = client.pipeline(transaction=True)
        try:
            queues: dict[str, list[str]] = {}
            for msg in part:
                _before(msg)
                payload = _redis_payload(msg, ids, default_priority, codec)
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


def _send_redis_kombu_batch(producer: Any, messages: Sequence[Outgoing], chunk: int,
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


def _send_each(producer: Any, messages: Sequence[Outgoing], track: _Tracker) -> None:
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


def _send_amqp(conn: Any, messages: Sequence[Outgoing], chunk: int, track: _Tracker) -> None:
    """Publish on a channel in confirm mode, with at most two chunks awaiting their confirms:
    chunk k+1 goes out while the broker confirms chunk k (it writes persistent messages to
    disk first), so its confirm latency is hidden, and a failure leaves at most two chunks
    unconfirmed."""
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

        def confirmed_up_to(count: int) -> None:
            """Wait until the first ``count`` messages are confirmed; fire their after signals."""
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while confirms.upto < count and not confirms.nacked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no publisher confirm within {CONFIRM_TIMEOUT:.0f} s")
                try:
                    conn.drain_events(timeout=min(left, 1.0))
                except TimeoutError:  # socket.timeout: no frame in this slice
                    continue
            if confirms.nacked:
                raise RuntimeError(f"the broker refused (nacked) delivery tag(s) {confirms.nacked}")
            done, track.confirmed = track.confirmed, max(track.confirmed, min(confirms.upto, sent))
            _after(messages[done:track.confirmed])

        try:
            for part in _chunks(messages, chunk):
                for msg in part:
                    _before(msg)
                    _publish_one(producer, msg)
                    sent += 1
                confirmed_up_to(sent - len(part))  # the chunk before this one
            confirmed_up_to(sent)
        except Exception as exc:
            done, track.confirmed = track.confirmed, max(track.confirmed, min(confirms.upto, sent))
            _after(messages[done:track.confirmed])
            raise track.failed(sent - track.confirmed, exc, "a RabbitMQ publish") from exc
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


def _send_events(app: Celery, messages: Sequence[Outgoing]) -> None:
    events = [m for m in messages if m.sent_event is not None]
    if not events:
        return
    with app.events.default_dispatcher() as dispatcher:
        for msg in events:
            fields = dict(msg.sent_event or {})
            fields.update(queue=getattr(msg.queue, "name", None), exchange=getattr(
                msg.exchange, "name", msg.exchange), routing_key=msg.routing_key)
            dispatcher.send("task-sent", **fields)


def send(app: Celery, messages: Sequence[Outgoing], chunk: int) -> None:
    """Send ``messages`` in order, ``chunk`` per round trip; ``PublishManyError`` on a failure."""
    track = _Tracker(messages)
    try:
        with _connection(app) as conn:
            driver = conn.transport.driver_type
            channel_module = type(conn.default_channel).__module__
            if driver == "redis":
                _send_redis(conn, messages, chunk, track)
            elif driver == "amqp" and channel_module.startswith("kombu.transport.pyamqp"):
                _send_amqp(conn, messages, chunk, track)
            else:
                _send_each(_producer(conn.default_channel), messages, track)
    except PublishManyError:
        raise
    except Exception as exc:  # connecting, declaring: before anything was sent
        raise track.failed(0, exc, "connecting to the broker") from exc
    _send_events(app, messages)
