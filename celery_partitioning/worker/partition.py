"""One partition, consumed by a thread of its own: one message at a time, in queue order.

On Redis the thread takes the partition's lease (a standby waits here), puts back at the head
what a dead predecessor held, then loops: ``BLMOVE`` moves the next message into the
partition's in-transit list in one step, so a SIGKILL never loses it, and its ack takes it off.
On RabbitMQ it owns a prefetch-1 channel on the single-active-consumer queue (a balanced member
takes the lease too, ``pipeline.py``).

Every message goes through :meth:`PartitionThread.handle`: what cannot run becomes a dead
letter; the stages may take it or send it back to the head; the task runs through Celery's
strategy in this thread (``executor.py``). A warm stop lets the running task finish and puts a
message fetched meanwhile back at the head.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Final

from celery.exceptions import InvalidTaskError, WorkerShutdown, WorkerTerminate
from kombu.exceptions import ContentDisallowed, DecodeError

from .. import compat
from ..exits import EXIT_KEEP_MESSAGE, exit_now
from ..message import PartitionMessage, raw_message_of, raw_message_problem
from ..state import partitioning_of
from ..store.broker import FETCH_TIMEOUT, fetch_name, restore_unacked_to_head, unreachable_errors
from .runtime import PartitionRuntime, bind_thread
from .stage import Verdict
from .startup import Backoff

__all__ = ["PartitionThread", "RedisAck"]

logger = logging.getLogger("celery_partitioning.worker")

#: Seconds a RabbitMQ delivery wait lasts before the thread checks whether it should stop.
AMQP_WAIT: Final = 1.0
#: An empty fetch back this much before its time-out was unblocked (a stop, or an operator's
#: pause), not timed out.
WOKEN_MARGIN: Final = 0.5
#: Shortest wait of a fetch (a key due at once must not make it spin).
FETCH_MIN: Final = 0.01


class RedisAck:
    """The channel of a message fetched from Redis. The fetch moved it into the in-transit list:
    an ack takes it off, a requeue moves it back to the head, each in one step, so a crash
    leaves it in exactly one of the two lists."""

    no_ack_consumers = None

    def __init__(self, client: Any, in_transit: str, source: str, item: bytes) -> None:
        self.client = client
        self.in_transit = in_transit
        self.source = source
        self.item = item
        #: The ack could not reach Redis (a failover): the thread retries it before it fetches
        #: again, so a message that ran never comes back behind later ones.
        self.ack_pending = False

    def basic_ack(self, delivery_tag: Any = None, multiple: bool = False) -> None:
        self.ack_pending = True
        self.client.lrem(self.in_transit, 1, self.item)
        self.ack_pending = False

    def basic_reject(self, delivery_tag: Any = None, requeue: bool = False) -> None:
        if requeue:
            self.to_head()
        else:
            self.basic_ack(delivery_tag)

    def to_head(self) -> None:
        with self.client.pipeline() as pipe:
            pipe.lrem(self.in_transit, 1, self.item)
            pipe.rpush(self.source, self.item)
            pipe.execute()

    def decode_body(self, body: Any, encoding: Any = None) -> Any:
        return compat.decode_virtual_body(body, encoding)


class PartitionThread(threading.Thread):
    """Consumes one partition until the process stops."""

    def __init__(self, runtime: PartitionRuntime) -> None:
        super().__init__(name=f"partition-{runtime.label}", daemon=True)
        self.runtime = runtime
        #: Set once the partition consumes (lease held, recovery done).
        self.consuming = threading.Event()
        #: A Redis (broker or store) that is gone: wait and recover, do not stop the process.
        self.unreachable = unreachable_errors()
        #: The name of its broker connections (Redis), which ``lifecycle.wake`` unblocks.
        self.fetch_name = ""
        #: When ``lifecycle.wake`` last unblocked its fetch (``time.monotonic()``).
        self.woken_at = 0.0

    # -- the thread -------------------------------------------------------------------------
    def run(self) -> None:
        runtime = self.runtime
        runtime.progress.bind()
        bind_thread(runtime)
        try:
            if runtime.broker is not None:
                self._run_redis()
            else:
                self._run_amqp()
        except BaseException:  # noqa: BLE001 - our own failure: no partition may go on half-broken
            exit_now(EXIT_KEEP_MESSAGE, "%s partition thread failed; stopping this process "
                     "without acking (its partitions recover at the head)", runtime.label,
                     exc_info=True)
        finally:
            if runtime.lease is not None:
                runtime.lease.release()
            logger.info("%s stopped", runtime.label)

    def _announce(self) -> None:
        runtime = self.runtime
        logger.info("%s consuming %s via %s (%s; %d message(s) recovered to the head; stages: "
                    "%s)", runtime.label, runtime.queue, runtime.transport,
                    "lease held" if runtime.lease is not None else "no lease",
                    runtime.recovered, runtime.pipeline.describe())
        self.consuming.set()

    # -- Redis ----------------------------------------------------------------------------
    def _take_lease(self) -> bool:
        runtime = self.runtime
        lease = runtime.lease
        if lease is None:
            return True
        try:
            taken = lease.try_acquire()
        except Exception as exc:  # noqa: BLE001 - store unreachable (failover): wait below
            logger.warning("%s lease store unreachable (%s); waiting", runtime.label, exc)
            taken = False
        if not taken:
            try:
                holder = lease.holder()
            except Exception:  # noqa: BLE001 - only for the message
                holder = None
            logger.warning("%s standby: partition %s is held by %s; waiting (takes over at most "
                           "%.0fs after the holder stops)", runtime.label, runtime.queue,
                           holder.describe() if holder else "another worker", lease.ttl)
            if not lease.acquire(runtime.stopping, runtime.label):
                logger.warning("%s stopped while standby", runtime.label)
                return False
        runtime.progress.consumed()
        lease.start_heartbeat()
        return True

    def _recover(self) -> None:
        runtime = self.runtime
        assert runtime.broker is not None
        moved = restore_unacked_to_head(runtime.broker, runtime.queue,
                                        runtime.keys.in_transit(runtime.queue))
        runtime.recovered += moved
        if moved:
            logger.warning("%s crash recovery: %d message(s) put back at the head of %s",
                           runtime.label, moved, runtime.queue)

    def _run_redis(self) -> None:
        runtime = self.runtime
        broker = runtime.broker
        assert broker is not None
        self.fetch_name = fetch_name(runtime.queue, self)
        broker.name_connections(self.fetch_name)
        if not self._take_lease():
            return
        self._recover()
        client = broker.client
        source = broker.queue_list(runtime.queue)
        in_transit = runtime.keys.in_transit(runtime.queue)
        self._announce()
        progress = runtime.progress
        idle = False
        while not runtime.stopping():
            progress.turned()
            timeout = self._between(idle, FETCH_TIMEOUT)
            began = time.monotonic()
            try:
                item = broker.fetch(runtime.queue, in_transit, timeout)
            except broker.errors as exc:
                logger.warning("%s broker unreachable while fetching (%s)", runtime.label, exc)
                self._settle(None, recover=True)  # what the lost connection held: to the head
                continue
            idle = item is None
            if item is None:
                if time.monotonic() - began < timeout - WOKEN_MARGIN:
                    for hook in runtime.on_woken:  # unblocked early: something was written
                        hook()
                continue
            progress.consumed()
            if self._stale():
                break  # the message stays in the in-transit list: the next holder recovers it
            channel = RedisAck(client, in_transit, source, item)
            if runtime.stopping():
                channel.to_head()
                break
            try:
                self._handle_raw(item, channel)
            except broker.errors as exc:
                # a failover mid-message: recovery puts it back at the head
                logger.warning("%s broker unreachable while handling a message (%s); it goes "
                               "back to the head", runtime.label, exc)
                self._settle(channel, recover=True)
                continue
            if channel.ack_pending:
                self._settle(channel, recover=False)

    def _settle(self, channel: RedisAck | None, recover: bool) -> None:
        """Until Redis answers, retry the ack a lost connection refused, or (``recover``) the
        recovery of the in-transit list; nothing is fetched meanwhile."""
        backoff = Backoff()
        while True:
            try:
                if recover or channel is None:
                    self._recover()
                else:
                    channel.basic_ack()
                return
            except self.unreachable as exc:
                if self.runtime.stopping():
                    return  # the next holder's recovery settles it
                logger.warning("%s broker unreachable (%s); retrying in %.1fs", self.runtime.label,
                               exc, backoff.pause)
                backoff.sleep()
                self.runtime.progress.turned()  # waiting for Redis, not stuck

    def _handle_raw(self, item: bytes, channel: RedisAck) -> None:
        problem = raw_message_problem(item)
        if problem is not None:
            self._malformed_raw(item, problem)
            channel.basic_ack()
            return
        message = compat.virtual_message(json.loads(item), channel)
        if not self.handle(message):
            channel.to_head()

    def _malformed_raw(self, raw: bytes | str, problem: str) -> None:
        dead_letters = self.runtime.dead_letters
        if dead_letters is None:
            exit_now(EXIT_KEEP_MESSAGE, "%s malformed message (%s) and no dead-letter store: "
                     "stopping without dropping it", self.runtime.label, problem)
        dead_letters.malformed(raw, problem)

    # -- RabbitMQ -------------------------------------------------------------------------
    def _run_amqp(self) -> None:
        from kombu.messaging import Consumer

        runtime = self.runtime
        app = runtime.app
        queue = partitioning_of(app).router.queue(runtime.pool, runtime.index)
        with app.connection_for_read() as probe:
            errors = (OSError, *probe.connection_errors, *probe.channel_errors)
        if not self._take_lease():
            return
        backoff = Backoff()
        started = False
        while not runtime.stopping():
            runtime.progress.turned()
            try:
                with app.connection_for_read(heartbeat=0) as conn:
                    conn.ensure_connection(max_retries=3)
                    channel = conn.channel()
                    channel.basic_qos(0, 1, False)
                    consumer = Consumer(
                        channel, queues=[queue], on_message=self._on_amqp,
                        accept=app.conf.accept_content, prefetch_count=1)
                    consumer.consume()
                    if not started:
                        started = True
                        self._announce()
                    backoff.reset()
                    idle = False
                    while not runtime.stopping():
                        runtime.progress.turned()
                        try:
                            conn.drain_events(timeout=self._between(idle, AMQP_WAIT))
                            idle = False
                        except TimeoutError:
                            idle = True
                    consumer.cancel()
            except errors as exc:
                if runtime.stopping():
                    return
                logger.warning("%s broker unreachable (%s); reconnecting in %.1fs", runtime.label,
                               exc, backoff.pause)
                backoff.sleep()

    def _on_amqp(self, message: Any) -> None:
        self.runtime.progress.consumed()
        if self._stale():
            return  # not acked: the broker redelivers it to the next consumer
        if self.runtime.stopping():
            message.requeue()  # RabbitMQ puts it back in its place: the head
            return
        if not self.handle(message):
            message.requeue()

    def _stale(self) -> bool:
        """A lease last renewed longer than its TTL ago (a frozen process): fenced, run nothing."""
        return self.runtime.lease is not None and not self.runtime.lease.fresh()

    def _between(self, idle: bool, longest: float) -> float:
        """The stages' ``between`` hooks; returns how long the next fetch may wait (at most
        ``longest``). ``idle``: the last fetch found the queue empty."""
        wait: float = longest
        for stage in list(self.runtime.pipeline.stages):
            try:
                asked = stage.between(idle)
            except self.unreachable as exc:
                logger.warning("%s store unreachable between messages (%s)", self.runtime.label,
                               exc)
                continue
            if asked is not None:
                wait = min(wait, asked)
        return max(FETCH_MIN, wait)

    # -- every message ----------------------------------------------------------------------
    def handle(self, message: Any) -> bool:
        """Run, set aside or dead-letter one message; False when it must go back to the head
        (the process stops first)."""
        runtime = self.runtime
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = headers.get("task")
        if not isinstance(name, str) or not name:
            return self._malformed(message, "not a Celery task message (no task name)")
        if name not in runtime.app.tasks:
            return self._malformed(message, f"unknown task {name!r} (not registered in this "
                                            "worker: is its module imported?)")
        msg = PartitionMessage(message, name)
        pipeline = runtime.pipeline
        try:
            verdict = pipeline.before(msg)
        except self.unreachable:
            raise  # the partition loop puts the message back at the head and waits
        except Exception:  # noqa: BLE001 - exit_now logs the traceback
            exit_now(EXIT_KEEP_MESSAGE, "%s stage %s failed on message %s (task %s); stopping "
                     "without acking so the message is not run out of order", runtime.label,
                     getattr(pipeline.asking, "name", "?"), msg.task_id, name, exc_info=True)
        if verdict is not Verdict.RUN:
            return verdict is Verdict.TAKEN
        executor = runtime.worker.executor if runtime.worker is not None else None
        assert executor is not None, "the worker runtime starts the executor first"
        try:
            executor.run(name, message, lambda: pipeline.after(msg))
        except (ContentDisallowed, DecodeError) as exc:
            return self._malformed(message, f"the body cannot be decoded "
                                            f"({message.content_type}): {exc}")
        except (WorkerShutdown, WorkerTerminate):
            # a shutdown during an in-place retry wait: not acked, back to the head
            logger.warning("%s stopping during task %s: it goes back to the head of %s",
                           runtime.label, msg.task_id, runtime.queue)
            return bool(message.acknowledged)
        except InvalidTaskError as exc:
            return self._malformed(message, f"invalid task message: {exc}")
        return True

    def _malformed(self, message: Any, problem: str) -> bool:
        self._malformed_raw(raw_message_of(message), problem)
        message.ack()
        return True

