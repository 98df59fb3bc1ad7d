"""The incoming message codec: reading a received kombu message and re-publishing it unchanged.

A message is seen either as a live kombu ``Message`` or as its *raw message* (what kombu
builds a ``Message`` from): the JSON text kombu's Redis transport keeps in its lists and ``unacked``
hash (``{"body", "content-encoding", "content-type", "headers", "properties"}``, the body
base64-encoded). This module converts between the two, reads the partition headers, says
what is wrong with a malformed message, and re-publishes a raw message to a partition queue
with all its headers and properties, whatever the broker. Outgoing messages are
``envelope.py``'s.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .compat import kombu_payload
from .router import HEADER_COUNT, HEADER_KEY, HEADER_POOL
from .state import partitioning_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["KEPT_PROPERTIES", "MessageSummary", "PartitionMessage", "Publish", "UnackedEntry",
           "decode_raw", "raw_message_problem", "mark_redelivered", "message_summary",
           "raw_message_id", "raw_message_of", "publisher", "republish"]

#: Message properties that travel with a re-published message (every AMQP basic property
#: a Celery message may carry, except ``priority``, which partitioned messages never have).
KEPT_PROPERTIES: Final = ("correlation_id", "reply_to", "delivery_mode", "expiration",
                          "message_id", "timestamp", "type", "user_id", "app_id")
#: The keys every raw message has.
_ENVELOPE: Final = ("body", "headers", "properties")

#: Re-publishes one raw message to its partition queue (``store/requeue.ThroughOutbox``).
Publish = Callable[[str], None]


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int_header(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_header(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(eq=False)
class PartitionMessage:
    """A received kombu message, as the partition worker's stages see it, with what one stage
    tells a later one about it (``worker/stage.py``)."""

    #: The kombu message as received.
    message: Any
    #: The task name from the message (``headers["task"]``).
    task_name: str
    #: The task id's retry record (JSON, None: none), if a stage read it (``attempts_read``).
    attempts: str | None = None
    attempts_read: bool = False
    #: The arguments to run with instead of the message's (a retry resumed after a crash).
    call: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    _received: str | None = None

    @property
    def headers(self) -> dict[str, Any]:
        headers = self.message.headers
        return headers if isinstance(headers, dict) else {}

    @property
    def task_id(self) -> str | None:
        return _str_header(self.headers.get("id"))

    @property
    def partition_key(self) -> str | None:
        return _str_header(self.headers.get(HEADER_KEY))

    @property
    def partition_pool(self) -> str | None:
        return _str_header(self.headers.get(HEADER_POOL))

    @property
    def partition_count(self) -> int | None:
        return _int_header(self.headers.get(HEADER_COUNT))

    @property
    def in_transit(self) -> tuple[str, bytes] | None:
        """A message fetched from Redis: the in-transit list it waits in until acked, and its
        exact bytes there (what an ack removes); None for other brokers."""
        channel = getattr(self.message, "channel", None)
        name, item = getattr(channel, "in_transit", None), getattr(channel, "item", None)
        return (name, item) if isinstance(name, str) and isinstance(item, bytes) else None

    def raw(self) -> str:
        """The raw message (JSON text) as received (:func:`raw_message_of`; read once, before
        a stage changes a header)."""
        if self._received is None:
            self._received = raw_message_of(self.message)
        return self._received

    def ack(self) -> None:
        """Acknowledge the message: the broker forgets it."""
        self.message.ack()


def raw_message_of(message: Any) -> str:
    """A kombu message as kombu's Redis transport stores it (JSON text), to re-queue it as is.

    Redis (virtual transport) messages carry their raw message; others (py-amqp) are rebuilt in
    the same shape, with the body base64-encoded.
    """
    raw = kombu_payload(message)
    if raw is not None:
        return json.dumps(raw)
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    properties = dict(message.properties or {})
    properties.pop("application_headers", None)
    properties["body_encoding"] = "base64"
    properties["delivery_info"] = {
        k: v for k, v in dict(message.delivery_info or {}).items()
        if k in ("exchange", "routing_key")
    }
    return json.dumps({
        "body": base64.b64encode(body or b"").decode("ascii"),
        "content-type": message.content_type,
        "content-encoding": message.content_encoding,
        "headers": dict(message.headers or {}),
        "properties": properties,
    }, default=str)


def decode_raw(raw: str | bytes) -> dict[str, Any] | None:
    """The raw message as a dict, or None when it is not a JSON object."""
    try:
        fields = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return fields if isinstance(fields, dict) else None


def raw_message_problem(raw: str | bytes) -> str | None:
    """Why ``raw`` is not a message kombu's Redis transport can deliver (None: it is one)."""
    try:
        fields = json.loads(raw)
    except (ValueError, TypeError):
        return "not JSON: not a kombu message"
    if not isinstance(fields, dict) or not all(k in fields for k in _ENVELOPE):
        return "JSON but not a kombu message envelope (body, headers, properties)"
    if not isinstance(fields["properties"], dict) or not isinstance(fields["headers"], dict):
        return "a kombu envelope whose headers or properties are not objects"
    return None


def raw_message_id(raw: str | bytes) -> str:
    """The task id of a raw message, else a digest of its bytes (stable, for idempotency)."""
    fields = decode_raw(raw)
    if fields is not None:
        found = (_str_header(_mapping(fields.get("headers")).get("id"))
                 or _str_header(_mapping(fields.get("properties")).get("correlation_id")))
        if found is not None:
            return found
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    return "raw-" + hashlib.blake2b(data, digest_size=12).hexdigest()


@dataclass(frozen=True)
class UnackedEntry:
    """One entry of kombu's Redis ``unacked`` hash: ``[message, exchange, routing_key]``."""

    message: dict[str, Any]
    routing_key: str

    @classmethod
    def parse(cls, raw: bytes | str) -> UnackedEntry | None:
        try:
            fields, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            return None
        if not isinstance(fields, dict) or not isinstance(routing_key, str):
            return None
        return cls(fields, routing_key)

    @property
    def priority(self) -> int:
        return priority_of(self.message)


def priority_of(fields: dict[str, Any]) -> int:
    return _int_header(_mapping(fields.get("properties")).get("priority")) or 0


def delivery_tag_of(fields: dict[str, Any]) -> str | None:
    tag = (fields.get("properties") or {}).get("delivery_tag")
    return str(tag) if tag is not None else None


def mark_redelivered(fields: dict[str, Any]) -> None:
    """Flag a message going back to its queue after a crash as redelivered (as kombu does)."""
    headers = fields.get("headers")
    if isinstance(headers, dict):
        headers["redelivered"] = True
    properties = fields.get("properties")
    info = properties.get("delivery_info") if isinstance(properties, dict) else None
    if isinstance(info, dict):
        info["redelivered"] = True


@dataclass(frozen=True)
class MessageSummary:
    """Task id, name and argument reprs of one raw message (what ``dead-letters list`` shows)."""

    id: str
    task: str
    args: str
    kwargs: str


def message_summary(raw: str | bytes) -> MessageSummary:
    """Summarize a raw message (Celery protocol 2, or 1); anything else as ``?``."""
    fields = decode_raw(raw)
    if fields is None:
        return MessageSummary(id=raw_message_id(raw), task="?", args="", kwargs="")
    headers = _mapping(fields.get("headers"))
    props = _mapping(fields.get("properties"))
    task_id = headers.get("id") or props.get("correlation_id") or "?"
    task = headers.get("task")
    args, kwargs = headers.get("argsrepr"), headers.get("kwargsrepr")
    if task is None or args is None:
        try:  # protocol 1 keeps everything in the (base64 JSON) body
            body = fields.get("body") or ""
            if props.get("body_encoding") == "base64":
                body = base64.b64decode(body).decode("utf-8")
            decoded = json.loads(body)
            if isinstance(decoded, dict):
                task = task or decoded.get("task")
                task_id = decoded.get("id", task_id)
                args = args or repr(decoded.get("args"))
                kwargs = kwargs or repr(decoded.get("kwargs"))
            elif isinstance(decoded, list) and len(decoded) >= 2:
                args = args or repr(decoded[0])
                kwargs = kwargs or repr(decoded[1])
        except (ValueError, TypeError):
            pass
    return MessageSummary(id=str(task_id), task=str(task or "?"), args=str(args or ""),
                          kwargs=str(kwargs or ""))


def republish(app: Celery, pool: str, index: int, raw: str | bytes,
              headers: dict[str, Any] | None = None, *, producer: Any = None) -> None:
    """Publish a raw message to partition ``index`` of ``pool``: same body, headers (or
    ``headers``), content type and properties; through the app's broker, whatever it is.

    ``producer``: publish through this one (messages that must arrive in the order they are
    published must share a channel: a broker orders nothing across connections)."""
    fields = decode_raw(raw)
    if fields is None:
        raise ValueError("cannot re-publish a message that is not a kombu raw message")
    queue = partitioning_of(app).router.queue(pool, index)
    props = fields.get("properties") or {}
    body: Any = fields.get("body") or ""
    if props.get("body_encoding") == "base64":
        body = base64.b64decode(body)
    options = {name: props[name] for name in KEPT_PROPERTIES if props.get(name) is not None}
    with app.producer_or_acquire(producer) as sender:
        sender.publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
            headers=dict(fields.get("headers") or {}) if headers is None else headers,
            content_type=fields.get("content-type") or "application/json",
            content_encoding=fields.get("content-encoding") or "utf-8",
            retry=True, **options)


def publisher(app: Celery, pool: str, index: int) -> Publish:
    """A :data:`Publish` to partition ``index`` of ``pool`` (see :func:`republish`), for one
    thread, through one producer on a connection opened at the first message and kept: a key's
    messages re-queued one after another must arrive in that order, and a broker orders
    nothing across connections (the app's producer pool may hand out another at each call)."""
    held: list[Any] = []

    def publish(raw: str) -> None:
        if not held:
            from kombu.messaging import Producer

            held.append(Producer(app.connection_for_write()))
        republish(app, pool, index, raw, producer=held[0])

    return publish
