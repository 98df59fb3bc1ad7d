"""Delivering composed messages to the broker in chunks, and saying exactly what arrived.

One path per broker, in the order of the messages:

* Redis: one ``MULTI``/``LPUSH``.../``EXEC`` round trip per chunk (a chunk lands whole or not
  at all), with the JSON kombu's Redis transport writes (``envelope.redis_json``);
* RabbitMQ (py-amqp): ``Producer.publish`` on a channel in publisher-confirm mode, chunk k+1
  sent while the broker confirms chunk k;
* any other transport: ``Producer.publish``, each message confirmed by its return.

A failure becomes a ``PublishManyError`` with the positions ``published`` (confirmed),
``unconfirmed`` (in the failed round trip) and ``not_sent``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
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


def _chunks(items: Sequence[Outgoing], size: int) -> Iterator[Sequence[Outgoing]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _own(msg: Outgoing) -> None:
    """Give ``msg`` its own lists and dicts (a template's are shared) before a signal receiver,
    which may change them as with ``apply_async``, gets them."""
    msg.headers = {k: v.copy() if isinstance(v, (list, dict)) else v for k, v in msg.headers.items()}
    args, kwargs, embed = msg.raw_body
    msg.raw_body = (args, kwargs, dict(embed))
    msg.template = None


class _Delivery:
    """The signals around each message, and which positions the broker confirmed."""

    def __init__(self, messages: Sequence[Outgoing], retry_policy: Any) -> None:
        self.messages, self.retry_policy = messages, retry_policy
        self.confirmed = 0  # messages[:confirmed] are on the broker

    def before(self, msg: Outgoing) -> None:
        if signals.before_task_publish.receivers and not msg.announced:
            _own(msg)
            signals.before_task_publish.send(
                sender=msg.name, body=msg.raw_body, exchange=msg.exchange,
                routing_key=msg.routing_key, declare=[] if msg.queue is None else [msg.queue],
                headers=msg.headers, properties=msg.properties, retry_policy=self.retry_policy)
            # Serialized again: receivers may have changed the body (apply_async serializes after).
            msg.content_type, msg.content_encoding, msg.body = serialize(msg.raw_body,
                                                                        msg.serializer)

    def confirm(self, upto: int) -> None:
        """The first ``upto`` messages are on the broker: their after signals fire."""
        done, self.confirmed = self.confirmed, max(self.confirmed, upto)
        if signals.after_task_publish.receivers:
            for msg in self.messages[done:self.confirmed]:
                if msg.announced:
                    continue
                if msg.template is not None:
                    _own(msg)
                signals.after_task_publish.send(
                    sender=msg.name, body=msg.raw_body, headers=msg.headers,
                    exchange=msg.exchange, routing_key=msg.routing_key)

    def failed(self, sent: int, exc: BaseException, where: str) -> PublishManyError:
        done, positions = self.confirmed, [m.position for m in self.messages]
        in_flight = max(sent - done, 0)
        return PublishManyError(
            f"publish_many: {where} failed ({type(exc).__name__}: {exc}); "
            f"{done} of {len(positions)} published and confirmed, {in_flight} unconfirmed "
            f"(sent in the failed round trip), {len(positions) - done - in_flight} not sent; "
            "see .published, .unconfirmed and .not_sent",
            published=positions[:done], unconfirmed=positions[done:done + in_flight],
            not_sent=positions[done + in_flight:], task_ids=[m.task_id for m in self.messages])


def _declare(channel: Any, messages: Sequence[Outgoing], retry_policy: Any) -> None:
    """Declare each queue of the batch once per connection, as ``apply_async`` does."""
    declared = channel.connection.client.declared_entities
    for queue in {id(m.queue): m.queue for m in messages if m.queue is not None}.values():
        if not (queue.can_cache_declaration and hash(queue) in declared):  # as maybe_declare
            maybe_declare(queue if queue.is_bound else queue.bind(channel), channel,
                          retry=True, **retry_policy)


def _send_redis(conn: Any, delivery: _Delivery, chunk: int) -> None:
    """The channel's own client (URL, TLS, ``global_keyprefix``), which kombu builds without
    retries: a failed round trip is never replayed."""
    channel = conn.default_channel
    if getattr(channel, "retry_on_timeout", False) or channel.body_encoding != "base64":
        raise PartitionConfigError(
            "publish_many batches on Redis with kombu's default body_encoding (base64) and "
            "without the transport option retry_on_timeout (a replayed MULTI/EXEC would "
            "publish a chunk twice, out of order); use apply_async")
    _declare(channel, delivery.messages, delivery.retry_policy)
    tags, client, sent = uuid4_strings(), channel.client, 0
    destinations: dict[tuple[str, str, int], Any] = {}
    for part in _chunks(delivery.messages, chunk):
        lists: dict[str, list[str]] = {}
        expiring: dict[str, int] = {}
        try:
            for msg in part:
                delivery.before(msg)
                priority = msg.properties.get("priority") or channel.default_priority
                where = (msg.exchange, msg.routing_key, priority)
                if where not in destinations:
                    destinations[where] = redis_destinations(channel, *where)
                pushes, expiries = destinations[where]
                payload = redis_json(msg, next(tags), channel.default_priority)
                for key in pushes:
                    lists.setdefault(key, []).append(payload)
                expiring.update(expiries)
        except Exception as exc:
            raise delivery.failed(sent, exc, "building a Redis pipeline") from exc
        pipe = client.pipeline(transaction=True)
        try:  # LPUSH q a b c leaves q as LPUSH q a; LPUSH q b; LPUSH q c would: one per queue
            for key, payloads in lists.items():
                pipe.lpush(key, *payloads)
            for key, ms in expiring.items():
                pipe.pexpire(key, ms)
            pipe.execute()
        except Exception as exc:
            raise delivery.failed(sent + len(part), exc, "a Redis MULTI/EXEC round trip") from exc
        finally:
            pipe.reset()
        sent += len(part)
        delivery.confirm(sent)


def _send_kombu(conn: Any, delivery: _Delivery, chunk: int) -> None:
    """``Producer.publish`` per message; on py-amqp in confirm mode, with at most two chunks
    awaiting their confirms (chunk k+1 goes out while the broker writes chunk k), else each
    message is on the broker when ``publish`` returns."""
    amqp = type(conn.default_channel).__module__.startswith("kombu.transport.pyamqp")
    channel = conn.channel() if amqp else conn.default_channel
    try:
        confirmed: Callable[[int], None] = delivery.confirm
        if amqp:
            confirmed = _confirms(conn, channel, delivery)
        _declare(channel, delivery.messages, delivery.retry_policy)
        producer, sent = Producer(channel), 0
        try:
            for part in _chunks(delivery.messages, chunk):
                for msg in part:
                    delivery.before(msg)
                    sent += 1  # until the broker confirms it: maybe on the broker, maybe not
                    producer.publish(
                        msg.body, exchange=msg.exchange, routing_key=msg.routing_key,
                        content_type=msg.content_type, content_encoding=msg.content_encoding,
                        compression=msg.compression, headers=msg.headers,
                        delivery_mode=msg.delivery_mode, declare=[], retry=False, **msg.properties)
                    if not amqp:
                        delivery.confirm(sent)
                confirmed(sent - len(part))  # the chunk before this one
            confirmed(sent)
        except Exception as exc:
            with suppress(Exception):
                confirmed(-1)  # what the broker confirmed so far, without waiting
            raise delivery.failed(sent, exc, "a publish") from exc
    finally:
        if amqp:
            with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
                channel.close()  # the connection may be gone: the error raised says so


def _confirms(conn: Any, channel: Any, delivery: _Delivery) -> Callable[[int], None]:
    """Put ``channel`` in confirm mode; returns "wait until the first ``count`` messages are
    confirmed" (``-1``: take the confirms received, do not wait)."""
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
        while count >= 0 and upto < count and not nacked:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no publisher confirm within {CONFIRM_TIMEOUT:.0f} s")
            with suppress(TimeoutError):  # socket.timeout: no frame in this slice
                conn.drain_events(timeout=1.0)
        delivery.confirm(upto)
        if nacked:
            raise RuntimeError(f"the broker refused (nacked) delivery tag(s) {nacked}")

    return wait


def deliver(app: Celery, messages: Sequence[Outgoing], chunk: int, retry_policy: Any) -> None:
    """Send ``messages`` in order, ``chunk`` per round trip; ``PublishManyError`` on a failure."""
    delivery = _Delivery(messages, retry_policy)
    try:
        with app.pool.acquire(block=True) as conn:
            try:
                if conn.transport.driver_type == "redis":
                    _send_redis(conn, delivery, chunk)
                else:
                    _send_kombu(conn, delivery, chunk)
            except BaseException:
                # A connection that failed mid-batch goes back to the pool reset, not half-used.
                with suppress(OSError, *conn.connection_errors, *conn.channel_errors):
                    conn.collect()
                raise
    except (PublishManyError, PartitionConfigError):
        raise
    except Exception as exc:  # connecting, declaring: before anything was sent
        raise delivery.failed(0, exc, "connecting to the broker") from exc
    events = [m for m in messages if m.sent_event is not None]
    if events:
        with app.events.default_dispatcher() as dispatcher:
            for msg in events:
                dispatcher.send("task-sent", **dict(
                    msg.sent_event or {}, queue=getattr(msg.queue, "name", None),
                    exchange=msg.exchange, routing_key=msg.routing_key))
