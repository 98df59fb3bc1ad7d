"""Sending composed task messages to the broker in chunks, and saying exactly what arrived.

``publish_many`` (``publish.py``) composes every message first; this module sends them in order:

* Redis: one ``MULTI``/``LPUSH``.../``EXEC`` round trip per chunk, with the payload kombu's
  Redis transport writes (or kombu's own publish batch for what that fast path does not cover);
* RabbitMQ (py-amqp): a channel in publisher-confirm mode, chunk k+1 sent while chunk k is
  being confirmed;
* any other transport: one ``Producer.publish`` per message.

Every sender keeps a ``_Tracker`` of the positions the broker confirmed, so a failure becomes a
``PublishManyError`` with ``published``, ``unconfirmed`` and ``not_sent``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Final

from celery import signals
from kombu.common import maybe_declare
from kombu.entity import Queue
from kombu.messaging import Producer

from .errors import PublishManyError
from .payload import (
    JSONCodec,
    Outgoing,
    own_containers,
    plain_redis_put,
    redis_payload,
    serialize,
    uuid4_strings,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["send", "CONFIRM_TIMEOUT"]

#: Seconds to wait for the publisher confirms of one chunk (RabbitMQ).
CONFIRM_TIMEOUT: Final = 30.0


def _chunks(items: Sequence[Outgoing], size: int) -> Iterator[Sequence[Outgoing]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _before(msg: Outgoing) -> None:
    if signals.before_task_publish.receivers and not msg.announced:
        own_containers(msg)
        signals.before_task_publish.send(
            sender=msg.name, body=msg.raw_body, exchange=msg.exchange, routing_key=msg.routing_key,
            declare=[] if msg.queue is None else [msg.queue], headers=msg.headers,
            properties=msg.properties,
            retry_policy=msg.retry_policy,
        )
        # Receivers may change the body, headers or properties they are given (as with
        # apply_async, which serializes after the signal): serialize what they left.
        msg.content_type, msg.content_encoding, msg.body = serialize(msg.raw_body, msg.serializer)


def _after(chunk: Sequence[Outgoing]) -> None:
    if signals.after_task_publish.receivers:
        for msg in chunk:
            if msg.announced:
                continue
            own_containers(msg)
            signals.after_task_publish.send(
                sender=msg.name, body=msg.raw_body, headers=msg.headers,
                exchange=msg.exchange, routing_key=msg.routing_key,
            )


def _producer(channel: Any) -> Any:
    return Producer(channel)


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
        if msg.queue is not None:
            seen.setdefault(id(msg.queue), msg.queue)
    declared = producer.channel.connection.client.declared_entities
    for entity in seen.values():
        if entity.can_cache_declaration and hash(entity) in declared:
            continue  # what maybe_declare would find, without binding a copy of the queue first
        # kombu 5.4's maybe_declare would declare it unbound
        bound = entity if entity.is_bound else entity.bind(producer.channel)
        maybe_declare(
            bound, producer.channel, retry=True, **messages[0].retry_policy)


def _send_redis(conn: Any, messages: Sequence[Outgoing], chunk: int, track: _Tracker) -> None:
    channel = conn.default_channel
    producer = _producer(channel)
    _declare(producer, messages)
    # e.g. retry_on_timeout set: a pipeline could replay (kombu 5.4 has no such property)
    batch_safe = getattr(channel, "supports_batch_publish",
                         not getattr(channel, "retry_on_timeout", False))
    if not batch_safe:
        _send_each(producer, messages, track)
    elif all(map(plain_redis_put, messages)) and channel.body_encoding == "base64":
        _send_redis_pipelined(channel, messages, chunk, track)
    elif hasattr(producer, "batch"):
        _send_redis_kombu_batch(producer, messages, chunk, track)
    else:  # kombu 5.4 has no publish batch
        _send_each(producer, messages, track)


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
                payload = redis_payload(msg, ids, default_priority, codec)
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
