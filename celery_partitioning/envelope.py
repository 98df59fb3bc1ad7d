"""An outgoing task message and its bytes: what ``publish_many`` composes and sends.

* ``Outgoing``: one composed message (Celery's headers, properties and body, its destination);
* ``Template``: a task's message for calls without options, taken from Celery's own
  ``amqp.create_task_message`` once per batch, with its invariant JSON pre-encoded;
* ``redis_json``: the JSON kombu's Redis transport ``LPUSH``es for a message;
* ``serialize``: kombu's serialization of a body.

The tests compare what this writes to Redis with what ``apply_async`` writes, key order included.
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
    #: Set when the headers are ``template``'s plus ``extra`` (the router's): pre-encoded JSON.
    template: Template | None
    extra: dict[str, Any] | None
    #: The publish signals fired already, when the call was made (an outbox row, relayed
    #: later): delivery fires none and sends ``body`` as it is.
    announced: bool = False


class Template:
    """A task's Celery message for calls without options, its invariant JSON encoded once.

    Such calls differ only by task id (headers ``id``, ``root_id``; property
    ``correlation_id``), arguments (the body) and their reprs (``argsrepr``, ``kwargsrepr``).
    ``build`` asks ``create_task_message`` for two sample messages and checks exactly that;
    a Celery that varies anything else gets no template (every message is then Celery's own).
    The headers' JSON is the constant ``pieces`` joined by the encoded varying values
    (``SLOTS``, in Celery's key order), as encoding the whole dict would write it.
    """

    SLOTS: Final = ("id", "root_id", "argsrepr", "kwargsrepr")

    __slots__ = ("embed", "headers", "keys", "pieces", "reply_to", "slots")

    def __init__(self, headers: dict[str, Any], reply_to: str, embed: dict[str, Any]) -> None:
        self.headers, self.reply_to, self.embed = headers, reply_to, embed
        self.keys = frozenset(headers)
        self.pieces: list[str] = []
        self.slots: list[str] = []
        text = "{"
        for key, value in headers.items():
            text += ("" if text == "{" else ", ") + _quote(key) + ": "
            if key in self.SLOTS:
                self.pieces.append(text)
                self.slots.append(key)
                text = ""
            else:
                text += encode(value)
        self.pieces.append(text)

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
        return cls(headers, reply_to, body[2])

    def message(self, task_id: str, args: Any, kwargs: Any, argsrepr: str,
                kwargsrepr: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """(headers, properties, body) of a call; its lists and dicts are the template's until
        a publish signal receiver gets them (``delivery.py`` copies them first)."""
        headers = self.headers.copy()
        headers["id"] = headers["root_id"] = task_id
        headers["argsrepr"], headers["kwargsrepr"] = argsrepr, kwargsrepr
        return (headers, {"correlation_id": task_id, "reply_to": self.reply_to},
                (args, kwargs, self.embed))

    def headers_json(self, headers: dict[str, Any], extra: dict[str, Any] | None) -> str:
        pieces, out = self.pieces, [self.pieces[0]]
        for index, name in enumerate(self.slots, 1):
            out += (_quote(headers[name]), pieces[index])
        if extra:
            out += (", ", encode(extra)[1:-1])  # a dict's pairs, without its braces
        out.append("}")
        return "".join(out)


_JSON: Final = JSONEncoder()  # kombu's, as ``kombu.utils.json.dumps`` builds it for every value
_C_ENCODER: Final = None if (make := c_json_encoder_factory()) is None else make(
    None, _JSON.default, _quote, None, ": ", ", ", False, False, True)


def encode(value: Any) -> str:
    """kombu's JSON of ``value``, with its C encoder built once (``json.dumps`` builds one per
    call, which costs more than encoding a small dict). Without circular-reference markers,
    so it is stateless: a circular value fails with ``RecursionError``, not ``ValueError``."""
    return _JSON.encode(value) if _C_ENCODER is None else "".join(_C_ENCODER(value, 0))


def serialize(body: Any, serializer: str, stock: bool = False) -> tuple[str, str, Any]:
    """What ``Producer.publish`` serializes: (content type, encoding, data). ``stock``: kombu's
    registry maps json to its own encoder (``compat.stock_json_serializer``), so use it here."""
    if serializer == "json" and stock:
        try:
            return "application/json", "utf-8", encode(body)
        except Exception as exc:  # what kombu's registry raises
            raise EncodeError(exc) from exc
    content_type, encoding, data = kombu_dumps(body, serializer=serializer)
    return str(content_type), str(encoding), data


#: ``Producer.publish`` parameters that Celery's leftover call options (its properties) may
#: carry: ``publish`` binds them by name, so they are not message properties.
_PUBLISH_PARAMETERS: Final = ("priority", "mandatory", "immediate", "expiration", "timeout",
                              "confirm_timeout")


def redis_json(msg: Outgoing, tag: str, default_priority: int) -> str:
    """The JSON kombu's Redis transport writes for ``msg``: what ``Producer.publish`` (body
    bytes, compression, delivery mode, expiration), ``Channel.prepare_message`` (the
    envelope) and ``basic_publish`` (base64 body, delivery tag and info) build, in order."""
    body, encoding, headers = msg.body, msg.content_encoding, msg.headers
    if type(body) is str:
        encoding = encoding or "utf-8"
        body = body.encode(encoding)
    elif not encoding:
        encoding = "binary"
    properties = msg.properties
    if (msg.template is not None and not msg.compression and msg.exchange == ""
            and properties.keys() == {"correlation_id", "reply_to"}
            and type(msg.delivery_mode) is int and msg.delivery_mode):
        # The template's message: the same bytes, its headers pre-encoded, no other property.
        return "".join((
            '{"body": "', b64encode(body).decode(), '", "content-encoding": ', _quote(encoding),
            ', "content-type": ', _quote(msg.content_type), ', "headers": ',
            msg.template.headers_json(headers, msg.extra), ', "properties": {"correlation_id": ',
            _quote(properties["correlation_id"]), ', "reply_to": ', _quote(properties["reply_to"]),
            ', "delivery_mode": ', str(msg.delivery_mode),
            ', "delivery_info": {"exchange": "", "routing_key": ', _quote(msg.routing_key),
            '}, "priority": ', str(int(default_priority)), ', "body_encoding": "base64", '
            '"delivery_tag": ', _quote(tag), "}}"))
    if msg.compression:
        body, headers["compression"] = compress(body, msg.compression)
    properties = {k: v for k, v in properties.items() if k not in _PUBLISH_PARAMETERS}
    properties["delivery_mode"] = maybe_delivery_mode(msg.delivery_mode)
    if msg.properties.get("expiration") is not None:
        properties["expiration"] = str(int(msg.properties["expiration"] * 1000))
    info = properties.setdefault("delivery_info", {})
    properties.setdefault("priority", msg.properties.get("priority") or default_priority)
    properties.update(body_encoding="base64", delivery_tag=tag)
    info.update(exchange=msg.exchange, routing_key=msg.routing_key)
    return encode({"body": b64encode(body).decode(), "content-encoding": encoding,
                         "content-type": msg.content_type, "headers": headers or {},
                         "properties": properties})


#: Hex digit → the same digit with the RFC 4122 variant bits (10xx) set.
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def uuid4_strings(batch: int = 512) -> Iterator[str]:
    """Random (version 4) UUID strings, as ``celery.utils.uuid()`` makes them, 3x cheaper."""
    while True:
        raw = os.urandom(16 * batch).hex()
        for at in range(0, 32 * batch, 32):
            h = raw[at:at + 32]
            yield f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"
