"""The bytes ``publish_many`` sends: Celery's task message as kombu would encode it, cheaper.

* ``Outgoing``: one composed message (what ``publish.py`` builds, what ``sending.py`` sends);
* ``JSONCodec``: kombu's JSON with one encoder per batch instead of one per value;
* ``MessageTemplate``: a task's Celery message built once, for calls without options;
* ``HeaderJSON``: a task template's headers pre-encoded around the fields that vary;
* ``redis_payload``: the JSON kombu's Redis transport ``LPUSH``es for a message;
* ``uuid4_strings``: task ids and delivery tags as ``uuid()`` makes them.

Every shortcut here produces the same bytes as the code it stands for; the tests compare the
Redis payload with what ``apply_async`` writes, byte for byte.
"""

from __future__ import annotations

import os
import re
from base64 import b64encode
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Final

from celery import signals
from kombu.entity import Exchange, Queue, maybe_delivery_mode
from kombu.exceptions import EncodeError
from kombu.serialization import dumps as _kombu_dumps
from kombu.utils.json import JSONEncoder
from kombu.utils.json import dumps as kombu_json_dumps

from .compat import c_json_encoder_factory, registered_serializer

__all__ = ["Outgoing", "HeaderJSON", "JSONCodec", "MessageTemplate", "own_containers", "serialize",
           "plain_redis_put", "redis_payload", "uuid4_strings"]


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
    retry_policy: dict[str, Any]
    sent_event: dict[str, Any] | None
    raw_body: Any
    ignore_result: bool
    #: Set when the headers are a task template's plus ``extra_headers`` (see ``HeaderJSON``).
    header_json: HeaderJSON | None = None
    extra_headers: dict[str, Any] | None = None
    #: A task template's message: these headers' values (lists, dicts) and the body's embed
    #: dict are the template's, shared with the batch's other messages (``own_containers``).
    shared: tuple[str, ...] | None = None
    #: The publish signals fired already, when the call was made (an outbox row, relayed
    #: later): sending fires none and sends ``body`` as it is.
    announced: bool = False


def own_containers(msg: Outgoing) -> None:
    """Give ``msg`` its own copies of what it shares with other messages, before a signal
    receiver (which may change them, as with ``apply_async``) sees its headers or body."""
    if msg.shared is not None:
        headers = msg.headers
        for name in msg.shared:
            headers[name] = headers[name].copy()
        args, kwargs, embed = msg.raw_body
        msg.raw_body = (args, kwargs, embed.copy())
        msg.shared = None


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
        pieces = self.pieces
        if len(pieces) == 5:  # Celery's four: id, root_id, argsrepr, kwargsrepr
            one, two, three, four = self.fields
            out = [pieces[0], _quote(headers[one]), pieces[1], _quote(headers[two]), pieces[2],
                   _quote(headers[three]), pieces[3], _quote(headers[four]), pieces[4]]
        else:
            out = [pieces[0]]
            for index, name in enumerate(self.fields, 1):
                out.append(_quote(headers[name]))
                out.append(pieces[index])
        if extra:
            out.append(", ")
            out.append(codec.encode(extra)[1:-1])
        out.append("}")
        return "".join(out)


class MessageTemplate:
    """Celery's task message for one task, built once by ``create_task_message`` and reused.

    A call without options differs from the next one only by its task id (``id``,
    ``root_id``, ``correlation_id``), its arguments and their reprs. ``build`` asks Celery
    for two such messages and checks exactly that; anything else differing (a Celery that
    adds a per-message field) means no template: every message is then built by
    ``create_task_message`` (as with sent events on: their event is per message).
    """

    __slots__ = ("embed", "header_json", "headers", "mutable", "reply_to")

    #: Headers that carry the task id, and the reprs.
    VARYING: Final = frozenset({"id", "root_id", "argsrepr", "kwargsrepr"})

    def __init__(self, headers: dict[str, Any], reply_to: str, embed: dict[str, Any]) -> None:
        self.headers = headers
        self.reply_to = reply_to
        self.embed = embed
        self.header_json = HeaderJSON(headers, ("id", "root_id", "argsrepr", "kwargsrepr"))
        #: Headers holding a list or dict (``timelimit``, ``stamps``): shared by the messages
        #: until a signal receiver could change one message's (see ``message``).
        self.mutable = tuple(k for k, v in headers.items() if isinstance(v, (list, dict)))

    @classmethod
    def build(cls, amqp: Any, task: Any, reply_to: str, origin: str) -> MessageTemplate | None:
        """The template of ``task``'s messages (``amqp``: the app's ``app.amqp``), or None."""

        def sample(tag: str) -> Any:
            return amqp.create_task_message(
                f"id-{tag}", task.name, (tag,), {tag: tag}, None, None, None, None, None, 0, None,
                None, None, reply_to, None, None, False, None, None, None, None,
                ignore_result=task.ignore_result, argsrepr=f"a-{tag}", kwargsrepr=f"k-{tag}",
                origin=origin)

        one, two = sample("1"), sample("2")
        headers, properties, body, sent_event = one
        expected = {"id": "id-1", "root_id": "id-1", "argsrepr": "a-1", "kwargsrepr": "k-1"}
        if (sent_event is not None or two[3] is not None
                or {k: headers.get(k) for k in cls.VARYING} != expected
                or {k: v for k, v in headers.items() if k not in cls.VARYING}
                != {k: v for k, v in two[0].items() if k not in cls.VARYING}
                or properties != {"correlation_id": "id-1", "reply_to": reply_to}
                or two[1] != {"correlation_id": "id-2", "reply_to": reply_to}
                or not isinstance(body, tuple) or len(body) != 3
                or body[:2] != (("1",), {"1": "1"}) or body[2] != two[2][2]):
            return None
        return cls(headers, reply_to, body[2])

    def message(self, task_id: str, args: Any, kwargs: Any, argsrepr: str,
                kwargsrepr: str) -> tuple[dict[str, Any], dict[str, Any], Any, None]:
        """A call's message. Its ``mutable`` header values and the body's embed dict are the
        template's own: ``own_containers`` copies them before a signal receiver sees them."""
        headers = self.headers.copy()
        headers["id"] = headers["root_id"] = task_id
        headers["argsrepr"], headers["kwargsrepr"] = argsrepr, kwargsrepr
        return (headers, {"correlation_id": task_id, "reply_to": self.reply_to},
                (args, kwargs, self.embed), None)


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
    content_type, encoding, data = _kombu_dumps(body, serializer=serializer)
    return str(content_type), str(encoding), data


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
        #: Whether kombu's registry maps json to its own encoder, read once per batch.
        self._stock = _stock_json()

    def _reset(self) -> None:
        make = c_json_encoder_factory()
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
        if serializer == "json" and self._stock:
            try:
                return "application/json", "utf-8", self.encode(body)
            except Exception as exc:  # what kombu's registry raises for an unserializable body
                raise EncodeError(exc) from exc
        return serialize(body, serializer)


def _stock_json() -> bool:
    """Whether kombu's registry still maps ``json`` to ``kombu.utils.json.dumps`` (a program
    may register its own)."""
    codec = registered_serializer("json")
    return codec is not None and tuple(codec) == (
        "application/json", "utf-8", kombu_json_dumps)


#: ``Producer.publish`` parameters a message's properties may carry (Celery passes leftover
#: call options as properties, and ``publish`` binds these by name).
_PUBLISH_PARAMETERS: Final = frozenset({"priority", "mandatory", "immediate", "expiration",
                                        "timeout", "confirm_timeout"})


def plain_redis_put(msg: Outgoing) -> bool:
    """Whether kombu's Redis ``_put`` would write this message as one LPUSH on its queue name.

    That is: the anonymous exchange (Celery's way for direct queues), priority 0 (else kombu
    picks a per-priority list), no queue expiry (else kombu adds PEXPIREs), no compression.
    """
    queue = msg.queue
    arguments = getattr(queue, "queue_arguments", None) or {}
    return (msg.exchange == "" and not msg.properties.get("priority") and not msg.compression
            and (queue is None or (getattr(queue, "expires", None) is None and "x-expires" not in arguments)))


def redis_payload(msg: Outgoing, ids: Iterator[str], default_priority: int,
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
    if msg.header_json is None or signals.before_task_publish.receivers:
        return codec.encode({  # what kombu.utils.json.dumps does
            "body": b64encode(body).decode(), "content-encoding": content_encoding,
            "content-type": msg.content_type, "headers": msg.headers or {},
            "properties": _properties(msg, ids, default_priority),
        })
    # The same bytes, with the headers from their pre-encoded template (base64 needs no escapes).
    return "".join((
        '{"body": "', b64encode(body).decode(), '", "content-encoding": ', _quote(content_encoding),
        ', "content-type": ', _quote(msg.content_type), ', "headers": ',
        msg.header_json.encode(msg.headers, msg.extra_headers, codec), ', "properties": ',
        _template_properties(msg, ids, default_priority) or codec.encode(
            _properties(msg, ids, default_priority)), "}",
    ))


def _template_properties(msg: Outgoing, ids: Iterator[str], default_priority: int) -> str | None:
    """The JSON of ``_properties`` for a message of a task template without extra properties
    (only its ``correlation_id`` and ``reply_to``), written directly; None for any other."""
    properties, mode, exchange = msg.properties, msg.delivery_mode, msg.exchange
    if len(properties) != 2:
        return None
    correlation_id, reply_to = properties.get("correlation_id"), properties.get("reply_to")
    if not (type(correlation_id) is str and type(reply_to) is str and type(mode) is int and mode
            and type(exchange) is str and type(msg.routing_key) is str
            and type(default_priority) is int):
        return None  # (an int is written as its str, as the JSON encoder writes it)
    return (f'{{"correlation_id": {_quote(correlation_id)}, "reply_to": '
            f'{_quote(reply_to)}, "delivery_mode": {mode}, "delivery_info": '
            f'{{"exchange": {_quote(exchange)}, "routing_key": {_quote(msg.routing_key)}}}, '
            f'"priority": {default_priority}, "body_encoding": "base64", "delivery_tag": '
            f'{_quote(next(ids))}}}')


def _properties(msg: Outgoing, ids: Iterator[str], default_priority: int) -> dict[str, Any]:
    """The message properties kombu's Redis transport writes (``Producer.publish``'s delivery
    mode and expiration, ``basic_publish``'s delivery tag and info), in their order."""
    properties = msg.properties.copy()
    expiration = None
    if not _PUBLISH_PARAMETERS.isdisjoint(properties):
        for name in _PUBLISH_PARAMETERS.intersection(properties):
            value = properties.pop(name)
            if name == "expiration":
                expiration = value
    properties["delivery_mode"] = maybe_delivery_mode(msg.delivery_mode)
    if expiration is not None:
        properties["expiration"] = str(int(expiration * 1000))
    info = properties.setdefault("delivery_info", {})
    properties.setdefault("priority", default_priority)
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = next(ids)
    info["exchange"], info["routing_key"] = msg.exchange, msg.routing_key
    return properties


def subtract_datetimes(end: datetime, start: datetime) -> timedelta:
    """The time between two datetimes, naive ones taken as UTC (what Celery 5.5+ computes for
    ``expires``; Celery 5.4 has no helper for it)."""
    from celery.utils.time import maybe_make_aware

    delta: timedelta = (maybe_make_aware(end).astimezone(UTC)
                        - maybe_make_aware(start).astimezone(UTC))
    return delta
