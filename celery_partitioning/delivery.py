"""Sending composed messages in order, a chunk per round trip, and saying exactly what arrived.

One path per broker: on Redis one ``MULTI``/``LPUSH``.../``EXEC`` per chunk (a chunk lands whole
or not at all); on RabbitMQ ``Producer.publish`` in publisher-confirm mode, chunk k+1 sent while
chunk k is confirmed; on any other transport ``Producer.publish``, confirmed by its return.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Final

from celery import signals
from kombu.common import maybe_declare
from kombu.messaging import Producer

from .compat import redis_destinations
from .envelope import Outgoing, redis_json, serialize, uuid4_strings
from .errors import PartitionConfigError, PublishManyError

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["deliver", "CONFIRM_TIMEOUT"]

#: Seconds to wait for the publisher confirms of one chunk (RabbitMQ).
CONFIRM_TIMEOUT: Final = 30.0


def _own(msg: Outgoing) -> None:
    """Give ``msg`` its own lists and dicts (a template's are shared) before a signal receiver,
    which may change them as with ``apply_async``, gets them."""
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

    def failed(self, exc: BaseException) -> PublishManyError:
        positions, done, sent = [m.position for m in self.messages], self.confirmed, self.sent
        return PublishManyError(
            f"publish_many: {type(exc).__name__}: {exc}; {done} of {len(positions)} published "
            f"and confirmed, {sent - done} unconfirmed (sent in the failed round trip), "
            f"{len(positions) - sent} not sent; see .published, .unconfirmed and .not_sent",
            published=positions[:done], unconfirmed=positions[done:sent],
            not_sent=positions[sent:], task_ids=[m.task_id for m in self.messages])

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
                "publish_many batches on Redis with kombu's default body_encoding (base64) and "
                "without the transport option retry_on_timeout (a replayed MULTI/EXEC would "
                "publish a chunk twice, out of order); use apply_async")
        self.declare(channel)
        tags, destinations = uuid4_strings(), {}
        for chunk in self.chunks:
            lists: dict[str, list[str]] = {}  # one LPUSH of many per list keeps their order
            expiring: dict[str, int] = {}
            for msg in chunk:
                self.before(msg)
                where = (msg.exchange, msg.routing_key,
                         msg.properties.get("priority") or channel.default_priority)
                if where not in destinations:
                    destinations[where] = redis_destinations(channel, *where)
                pushes, expiries = destinations[where]
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
        """``Producer.publish`` per message; on py-amqp in confirm mode, with at most two chunks
        awaiting their confirms."""
        default = conn.default_channel  # (re)connects as the app's broker options say
        confirms = conn.transport.driver_name == "py-amqp"
        channel = conn.channel() if confirms else default
        wait: Callable[[int], None] = self.confirm
        try:
            if confirms:
                wait = _confirms(conn, channel, self.confirm)
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
                        self.confirm(self.sent)
                wait(self.sent - len(chunk))  # the chunk before this one
            wait(self.sent)
        except Exception:
            with suppress(Exception):
                wait(-1)  # what the broker confirmed so far, without waiting
            raise
        finally:
            if confirms:
                with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
                    channel.close()  # the connection may be gone: the error raised says so


def _confirms(conn: Any, channel: Any, confirm: Callable[[int], None]) -> Callable[[int], None]:
    """Put ``channel`` in confirm mode; returns "wait until the first ``count`` messages are
    acked, then ``confirm`` them" (``-1``: the acks received so far, without waiting)."""
    acked: set[int] = set()
    nacked: list[int] = []
    upto = 0  # delivery tags 1..upto are acked

    def ack(tag: int, multiple: bool) -> None:
        nonlocal upto
        upto = max(upto, tag) if multiple else upto
        acked.add(tag)
        while upto + 1 in acked:
            upto += 1

    channel.events["basic_ack"].add(ack)
    channel.events["basic_nack"].add(lambda tag, multiple: nacked.append(tag))
    channel.confirm_select()

    def wait(count: int) -> None:
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while upto < count and not nacked:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no publisher confirm within {CONFIRM_TIMEOUT:.0f} s")
            with suppress(TimeoutError):  # socket.timeout: no frame in this slice
                conn.drain_events(timeout=1.0)
        confirm(upto)
        if nacked:
            raise RuntimeError(f"the broker refused (nacked) delivery tag(s) {nacked}")

    return wait


def deliver(app: Celery, messages: Sequence[Outgoing], chunk: int, retry_policy: Any) -> None:
    """Send ``messages`` in order, ``chunk`` per round trip; ``PublishManyError`` on a failure."""
    delivery = _Delivery(messages, chunk, retry_policy)
    try:
        with app.pool.acquire(block=True) as conn:
            try:
                redis = conn.transport.driver_type == "redis"
                (delivery.to_redis if redis else delivery.to_kombu)(conn)
            except BaseException:
                # A connection that failed mid-batch goes back to the pool reset, not half-used.
                with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
                    conn.collect()
                raise
    except Exception as exc:
        if isinstance(exc, PartitionConfigError) and not delivery.sent:
            raise
        raise delivery.failed(exc) from exc
    events = [m for m in messages if m.sent_event is not None]
    if events:
        with app.events.default_dispatcher() as dispatcher:
            for msg in events:
                dispatcher.send("task-sent", **{
                    **(msg.sent_event or {}), "queue": getattr(msg.queue, "name", None),
                    "exchange": msg.exchange, "routing_key": msg.routing_key})
