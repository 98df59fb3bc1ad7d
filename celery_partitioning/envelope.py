"""The outgoing task message ``publish_many`` composes, its task ``Template`` and its bytes.

``redis_json`` writes what kombu's Redis transport ``LPUSH``es; the tests compare it with what
``apply_async`` writes, key order included.
"""

from __future__ import annotations

import os
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Final

from kombu.compression import compress
from kombu.entity import Queue, maybe_delivery_mode
from kombu.exceptions import EncodeError
from kombu.serialization import dumps as kombu_dumps
from kombu.utils.json import JSONEncoder

from .compat import c_json_encoder_factory

__all__ = ["Outgoing", "Template", "encode", "redis_json", "serialize", "uuid4_strings"]


@dataclass(slots=True)
class Outgoing:
    """One composed message: the arguments of ``Producer.publish`` (``body`` serialized)."""

    position: int
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


#: A header value no message holds: where a template's header JSON is cut.
_SLOT: Final = "\x00slot\x00"


class Template:
    """A task's Celery message for calls without options, its invariant header JSON encoded once.

    ``build`` takes two sample messages from ``create_task_message`` and checks that they differ
    only by task id (headers ``id``, ``root_id``; property ``correlation_id``), arguments (the
    body) and their reprs (headers ``argsrepr``, ``kwargsrepr``); else there is no template.
    ``pieces`` are the header JSON around those ``SLOTS``, in Celery's key order.
    """

    SLOTS: Final = ("id", "root_id", "argsrepr", "kwargsrepr")

    __slots__ = ("embed", "headers", "keys", "pieces", "reply_to", "slots")

    def __init__(self, headers: dict[str, Any], reply_to: str, embed: dict[str, Any]) -> None:
        self.headers, self.reply_to, self.embed = headers, reply_to, embed
        self.keys = frozenset(headers)
        self.slots = [key for key in headers if key in self.SLOTS]
        cut = {key: _SLOT if key in self.SLOTS else value for key, value in headers.items()}
        self.pieces = encode(cut)[:-1].split(_quote(_SLOT))  # without the closing brace

    @classmethod
    def build(cls, amqp: Any, task: Any, reply_to: str, origin: str) -> Template | None:
        def sample(tag: str) -> Any:
            return amqp.create_task_message(
                f"id-{tag}", task.name, (tag,), {tag: tag}, reply_to=reply_to,
                ignore_result=task.ignore_result, argsrepr=f"a-{tag}", kwargsrepr=f"k-{tag}",
                origin=origin)

        (headers, properties, body, event), two = sample("1"), sample("2")
        same = {k: v for k, v in headers.items() if k not in cls.SLOTS}
        if (event is not None or two.sent_event is not None
                or [headers.get(k) for k in cls.SLOTS] != ["id-1", "id-1", "a-1", "k-1"]
                or same != {k: v for k, v in two.headers.items() if k not in cls.SLOTS}
                or properties != {"correlation_id": "id-1", "reply_to": reply_to}
                or two.properties != {"correlation_id": "id-2", "reply_to": reply_to}
                or not isinstance(body, tuple) or len(body) != 3
                or body[:2] != (("1",), {"1": "1"}) or body[2] != two.body[2]):
            return None
        template = cls(headers, reply_to, body[2])
        return template if len(template.pieces) == len(cls.SLOTS) + 1 else None

    def message(self, task_id: str, args: Any, kwargs: Any, argsrepr: str,
                kwargsrepr: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """(headers, properties, body) of a call; its lists and dicts are the template's until
        a publish signal receiver gets them (``delivery`` copies them first)."""
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
    """kombu's JSON of ``value`` through one C encoder built at import (``json.dumps`` builds
    one per call). Stateless: a circular value fails with ``RecursionError``."""
    return _JSON.encode(value) if _C_ENCODER is None else "".join(_C_ENCODER(value, 0))


def serialize(body: Any, serializer: str, stock: bool = False) -> tuple[str, str, Any]:
    """What ``Producer.publish`` serializes: (content type, encoding, data). ``stock``: kombu's
    registry maps json to its own encoder (``compat.stock_json_serializer``)."""
    if serializer == "json" and stock:
        try:
            return "application/json", "utf-8", encode(body)
        except Exception as exc:  # what kombu's registry raises
            raise EncodeError(exc) from exc
    content_type, encoding, data = kombu_dumps(body, serializer=serializer)
    return str(content_type), str(encoding), data


#: ``Producer.publish`` parameters that Celery's leftover call options (its properties) may
#: carry: bound by name there, so not message properties.
_PUBLISH_PARAMETERS: Final = frozenset({"priority", "mandatory", "immediate", "expiration",
                                        "timeout", "confirm_timeout"})


def redis_json(msg: Outgoing, tag: str, default_priority: int) -> str:
    """The JSON kombu's Redis transport writes for ``msg``: what ``Producer.publish`` (body
    bytes, compression, delivery mode, expiration), ``Channel.prepare_message`` (the envelope)
    and ``basic_publish`` (base64 body, delivery tag and info) build, in their key order."""
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
