"""The outgoing side of ``publish_many``: composed messages, their bytes, and their delivery in
order, a chunk per round trip, saying exactly what arrived. One path per broker: Redis, one
``MULTI``/``LPUSH``.../``EXEC`` per chunk of the JSON kombu's transport writes (``redis_json``);
RabbitMQ, ``Producer.publish`` with publisher confirms; others, ``Producer.publish``.
"""

from __future__ import annotations

import os
import time
from base64 import b64encode
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import cache, partial
from json.encoder import encode_basestring_ascii as _quote
from typing import TYPE_CHECKING, Any, Final

from celery import signals
from kombu.common import maybe_declare
from kombu.compression import compress
from kombu.entity import Queue, maybe_delivery_mode
from kombu.exceptions import EncodeError
from kombu.messaging import Producer
from kombu.serialization import dumps as kombu_dumps
from kombu.utils.json import JSONEncoder

from .compat import c_json_encoder_factory, redis_destinations
from .errors import PartitionConfigError, PublishManyError

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Outgoing", "Template", "deliver", "encode", "redis_json", "serialize", "uuid4_strings"]

#: Seconds to wait for the publisher confirms of one chunk (RabbitMQ).
CONFIRM_TIMEOUT: Final = 30.0


@dataclass(slots=True)
class Outgoing:
    """One composed message: the arguments of ``Producer.publish`` (``body`` serialized)."""

    name: str
    task_id: str
    queue: Queue | None
    exchange: str
    routing_key: str
    delivery_mode: Any
    headers: dict[str, Any]
    properties: dict[str, Any]
    raw_body: Any  # Celery's (args, kwargs, embed), what the publish signals get
    body: Any
    content_type: str
    content_encoding: str
    serializer: str
    compression: str | None
    sent_event: dict[str, Any] | None
    ignore_result: bool
    template: Template | None  # set when the headers are the template's, then ``extra``
    extra: dict[str, Any] | None
    announced: bool = False  # an outbox row: its publish signals fired when it was stored


class Template:
    """A task's Celery message for calls without options, taken from ``create_task_message``
    (``build`` checks that it makes a second sample exactly: calls differ only in task id,
    arguments and their reprs), its invariant header JSON encoded once (``pieces``)."""

    SLOTS: Final = ("id", "root_id", "argsrepr", "kwargsrepr")
    SLOT: Final = "\x00slot\x00"  # a header value no message holds: where the JSON is cut

    __slots__ = ("embed", "headers", "pieces", "reply_to", "slots")

    def __init__(self, headers: dict[str, Any], reply_to: str, embed: dict[str, Any]) -> None:
        self.headers, self.reply_to, self.embed = headers, reply_to, embed
        self.slots = [key for key in headers if key in self.SLOTS]
        cut = {key: self.SLOT if key in self.SLOTS else value for key, value in headers.items()}
        self.pieces = encode(cut)[:-1].split(_quote(self.SLOT))  # without the closing brace

    @classmethod
    def build(cls, amqp: Any, task: Any, reply_to: str, origin: str) -> Template | None:
        def sample(tag: str) -> Any:
            return amqp.create_task_message(f"id-{tag}", task.name, (tag,), {tag: tag}, reply_to=reply_to,
                                            ignore_result=task.ignore_result, argsrepr=f"a-{tag}",
                                            kwargsrepr=f"k-{tag}", origin=origin)

        one, two = sample("1"), sample("2")
        if not (isinstance(one.body, tuple) and len(one.body) == 3):
            return None
        template = cls(one.headers, reply_to, one.body[2])  # must make the second sample
        made = template.message("id-2", ("2",), {"2": "2"}, "a-2", "k-2")
        return template if (made == (two.headers, two.properties, two.body) and two.sent_event is None
                            and len(template.pieces) == len(cls.SLOTS) + 1) else None

    def message(self, task_id: str, args: Any, kwargs: Any, argsrepr: str,
                kwargsrepr: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """(headers, properties, body) of a call; its lists and dicts are the template's (``_own``)."""
        headers = self.headers.copy()
        headers["id"] = headers["root_id"] = task_id
        headers["argsrepr"], headers["kwargsrepr"] = argsrepr, kwargsrepr
        return (headers, {"correlation_id": task_id, "reply_to": self.reply_to},
                (args, kwargs, self.embed))

    def headers_json(self, headers: dict[str, Any], extra: dict[str, Any] | None) -> str:
        """``encode(headers)`` of a message whose headers are this template's, then ``extra``."""
        p, (one, two, three, four) = self.pieces, self.slots
        text = "".join((p[0], _quote(headers[one]), p[1], _quote(headers[two]), p[2],
                        _quote(headers[three]), p[3], _quote(headers[four]), p[4]))
        return f"{text}, {encode(extra)[1:]}" if extra else text + "}"


_JSON: Final = JSONEncoder()  # kombu's, as ``kombu.utils.json.dumps`` builds it for every value
_C_ENCODER: Final = None if (make := c_json_encoder_factory()) is None else make(
    None, _JSON.default, _quote, None, ": ", ", ", False, False, True)


def encode(value: Any) -> str:
    """kombu's JSON of ``value``, through one C encoder (``json.dumps`` builds one per call)."""
    return _JSON.encode(value) if _C_ENCODER is None else "".join(_C_ENCODER(value, 0))


def serialize(body: Any, serializer: str, stock: bool = False) -> tuple[str, str, Any]:
    """(content type, encoding, data) of ``body`` as ``Producer.publish`` serializes it;
    ``stock``: json is kombu's own (``compat.stock_json_serializer``)."""
    if serializer == "json" and stock:
        try:
            return "application/json", "utf-8", encode(body)
        except Exception as exc:  # what kombu's registry raises
            raise EncodeError(exc) from exc
    content_type, encoding, data = kombu_dumps(body, serializer=serializer)
    return str(content_type), str(encoding), data


#: ``Producer.publish`` parameters that leftover call options may carry: not message properties.
_PUBLISH_PARAMETERS: Final = frozenset({"priority", "mandatory", "immediate", "expiration",
                                        "timeout", "confirm_timeout"})


def redis_json(msg: Outgoing, tag: str, default_priority: int) -> str:
    """What kombu's Redis transport writes for ``msg`` (``Producer.publish``, then the channel's
    ``prepare_message`` and ``basic_publish``), in its key order."""
    body, encoding, headers, given = msg.body, msg.content_encoding, msg.headers, msg.properties
    if type(body) is str:
        encoding = encoding or "utf-8"
        body = body.encode(encoding)
    elif not encoding:
        encoding = "binary"
    if msg.compression:
        body, headers["compression"] = compress(body, msg.compression)
    if msg.template is not None and given.keys() == {"correlation_id", "reply_to"}:
        head = (f'{{"correlation_id": {_quote(given["correlation_id"])}, "reply_to": '
                f'{_quote(given["reply_to"])}, "delivery_mode": {maybe_delivery_mode(msg.delivery_mode)}')
    else:  # the same, in general
        props = {k: v for k, v in given.items() if k not in _PUBLISH_PARAMETERS}
        props["delivery_mode"] = maybe_delivery_mode(msg.delivery_mode)
        if given.get("expiration") is not None:
            props["expiration"] = str(int(given["expiration"] * 1000))
        head = encode(props)[:-1]
    return "".join((
        '{"body": "', b64encode(body).decode(), '", "content-encoding": ', _quote(encoding),
        ', "content-type": ', _quote(msg.content_type), ', "headers": ',
        encode(headers or {}) if msg.template is None or msg.compression
        else msg.template.headers_json(headers, msg.extra),
        ', "properties": ', head, ', "delivery_info": {"exchange": ',
        _quote(msg.exchange), ', "routing_key": ', _quote(msg.routing_key or ""),
        '}, "priority": ', encode(given.get("priority") or default_priority),
        ', "body_encoding": "base64", "delivery_tag": ', _quote(tag), "}}"))


#: Hex digit → the same digit with the RFC 4122 variant bits (10xx) set.
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def uuid4_strings(batch: int = 512) -> Iterator[str]:
    """Random (version 4) UUID strings, as ``celery.utils.uuid()`` makes them, 3x cheaper."""
    while True:
        raw = os.urandom(16 * batch).hex()
        for at in range(0, 32 * batch, 32):
            h = raw[at:at + 32]
            yield f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def _own(msg: Outgoing) -> None:
    """Give ``msg`` its own lists and dicts (a template's are shared) for a signal receiver."""
    msg.headers = {k: v.copy() if isinstance(v, (list, dict)) else v for k, v in msg.headers.items()}
    args, kwargs, embed = msg.raw_body
    msg.raw_body, msg.template = (args, kwargs, dict(embed)), None


class _Delivery:
    """One batch: its chunks, the signals around each message, what went out and what arrived."""

    def __init__(self, messages: Sequence[Outgoing], chunk: int, retry_policy: Any) -> None:
        self.messages, self.retry_policy = messages, retry_policy
        self.chunks = [messages[at:at + chunk] for at in range(0, len(messages), chunk)]
        self.sent = self.confirmed = 0  # messages[:sent] went out, messages[:confirmed] arrived

    def before(self, msg: Outgoing) -> None:
        if signals.before_task_publish.receivers and not msg.announced:
            _own(msg)
            signals.before_task_publish.send(
                sender=msg.name, body=msg.raw_body, exchange=msg.exchange,
                routing_key=msg.routing_key, declare=[] if msg.queue is None else [msg.queue],
                headers=msg.headers, properties=msg.properties, retry_policy=self.retry_policy)
            # Serialized again: receivers may have changed the body (apply_async serializes after).
            msg.content_type, msg.content_encoding, msg.body = serialize(msg.raw_body, msg.serializer)

    def confirm(self, upto: int) -> None:
        """The first ``upto`` messages are on the broker: their after signals fire."""
        done, self.confirmed = self.confirmed, max(self.confirmed, upto)
        if signals.after_task_publish.receivers:
            for msg in self.messages[done:self.confirmed]:
                if not msg.announced:
                    if msg.template is not None:
                        _own(msg)
                    signals.after_task_publish.send(
                        sender=msg.name, body=msg.raw_body, headers=msg.headers,
                        exchange=msg.exchange, routing_key=msg.routing_key)

    def declare(self, channel: Any) -> None:
        """Each queue of the batch once per connection, as ``apply_async`` declares them."""
        declared = channel.connection.client.declared_entities
        for queue in {id(m.queue): m.queue for m in self.messages if m.queue is not None}.values():
            if not (queue.can_cache_declaration and hash(queue) in declared):  # as maybe_declare
                maybe_declare(queue if queue.is_bound else queue.bind(channel), channel,
                              retry=True, **self.retry_policy)

    def to_redis(self, conn: Any) -> None:
        """Through the channel's own client (URL, TLS, ``global_keyprefix``), which kombu builds
        without retries: a failed round trip is never replayed."""
        channel = conn.default_channel
        if getattr(channel, "retry_on_timeout", False) or channel.body_encoding != "base64":
            raise PartitionConfigError(
                "publish_many batches on Redis with kombu's body_encoding (base64) and without "
                "retry_on_timeout (a replayed MULTI/EXEC would publish a chunk twice); use apply_async")
        self.declare(channel)
        tags, destinations = uuid4_strings(), cache(partial(redis_destinations, channel))
        for chunk in self.chunks:
            lists: dict[str, list[str]] = {}  # one LPUSH of many per list keeps their order
            expiring: dict[str, int] = {}
            for msg in chunk:
                self.before(msg)
                pushes, expiries = destinations(
                    msg.exchange, msg.routing_key, msg.properties.get("priority") or channel.default_priority)
                payload = redis_json(msg, next(tags), channel.default_priority)
                for key in pushes:
                    lists.setdefault(key, []).append(payload)
                expiring.update(expiries)
            self.sent += len(chunk)
            with channel.client.pipeline(transaction=True) as pipe:
                for key, payloads in lists.items():
                    pipe.lpush(key, *payloads)
                for key, ms in expiring.items():
                    pipe.pexpire(key, ms)
                pipe.execute()
            self.confirm(self.sent)

    def to_kombu(self, conn: Any) -> None:
        """``Producer.publish`` per message; on py-amqp with publisher confirms, chunk k+1 sent
        while chunk k is confirmed."""
        default = conn.default_channel  # (re)connects as the app's broker options say
        confirms = conn.transport.driver_name == "py-amqp"
        channel = conn.channel() if confirms else default
        acked: set[int] = set()
        nacked: list[int] = []
        upto = 0  # delivery tags 1..upto are acked

        def ack(tag: int, multiple: bool) -> None:
            nonlocal upto
            upto = max(upto, tag) if multiple else upto
            acked.add(tag)
            while upto + 1 in acked:
                upto += 1

        def wait(count: int) -> None:  # until the first count are acked; -1: those acked by now
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while confirms and upto < count and not nacked:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no publisher confirm within {CONFIRM_TIMEOUT:.0f} s")
                with suppress(TimeoutError):  # socket.timeout: no frame in this slice
                    conn.drain_events(timeout=1.0)
            self.confirm(upto)
            if nacked:
                raise RuntimeError(f"the broker refused (nacked) delivery tag(s) {nacked}")

        try:
            if confirms:
                channel.events["basic_ack"].add(ack)
                channel.events["basic_nack"].add(lambda tag, multiple: nacked.append(tag))
                channel.confirm_select()
            self.declare(channel)
            producer = Producer(channel)
            for chunk in self.chunks:
                for msg in chunk:
                    self.before(msg)
                    self.sent += 1  # until the broker confirms it: maybe on the broker, maybe not
                    producer.publish(
                        msg.body, exchange=msg.exchange, routing_key=msg.routing_key,
                        content_type=msg.content_type, content_encoding=msg.content_encoding,
                        compression=msg.compression, headers=msg.headers,
                        delivery_mode=msg.delivery_mode, declare=[], retry=False, **msg.properties)
                    if not confirms:
                        upto += 1  # on the broker once publish returned
                wait(self.sent - len(chunk))  # the chunk before this one
            wait(self.sent)
        except Exception:
            with suppress(Exception):
                wait(-1)
            raise
        finally:
            if confirms:
                with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
                    channel.close()  # the connection may be gone: the error raised says so


def deliver(app: Celery, messages: Sequence[Outgoing], chunk: int, retry_policy: Any) -> None:
    """Send ``messages`` in order, ``chunk`` per round trip; ``PublishManyError`` on a failure."""
    delivery = _Delivery(messages, chunk, retry_policy)
    try:
        with app.pool.acquire(block=True) as conn:
            try:
                (delivery.to_redis if conn.transport.driver_type == "redis" else delivery.to_kombu)(conn)
            except BaseException:
                # A connection that failed mid-batch goes back to the pool reset, not half-used.
                with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
                    conn.collect()
                raise
    except Exception as exc:
        if isinstance(exc, PartitionConfigError) and not delivery.sent:
            raise
        done, sent, count = delivery.confirmed, delivery.sent, len(messages)
        raise PublishManyError(
            f"publish_many: {type(exc).__name__}: {exc}; {done} of {count} published and "
            f"confirmed, {sent - done} unconfirmed (sent in the failed round trip), {count - sent} "
            "not sent; see .published, .unconfirmed and .not_sent", published=range(done),
            unconfirmed=range(done, sent), not_sent=range(sent, count),
            task_ids=[m.task_id for m in messages]) from exc
    if events := [m for m in messages if m.sent_event is not None]:
        with app.events.default_dispatcher() as dispatcher:
            for msg in events:
                dispatcher.send("task-sent", **(msg.sent_event or {}), queue=getattr(msg.queue, "name", None),
                                exchange=msg.exchange, routing_key=msg.routing_key)
