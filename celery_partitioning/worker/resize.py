"""The resize gate: keys that moved when their pool was resized wait for their old messages.

A resize from N to M partitions is recorded in Redis (``partitioning resize``,
``store/resize.py``). While it is in flight, for key ``k`` with old partition
``p = partition_for(k, N)`` and new partition ``q = partition_for(k, M)``:

* a key that did not move (``p == q``) runs at once, with no Redis round trip;
* an old-size message of a moved key, received on ``p``, goes in order to the key's ``moved``
  list, not to the tail of ``q``;
* a new-size message of a moved key, received on ``q`` before ``p`` is drained, is held in the
  key's ``held`` list;
* ``p`` is drained when its queue is empty or it meets a new-size message; old partitions with
  no new counterpart (a shrink) are emptied by partition ``p % M``;
* between messages, ``q`` releases every key whose old partition is drained (moved, then
  held) to the head of its queue, in one script;
* a message stamped with a count that is neither N nor M is held and logged as an error.

A process running a size other than the recorded one refuses to start, and stops warmly when
a resize is recorded under it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final

from .. import compat
from ..errors import PartitionConfigError
from ..hashing import partition_for
from ..message import (
    PartitionMessage,
    decode_raw,
    raw_message_id,
    raw_message_of,
)
from ..router import HEADER_COUNT, HEADER_KEY
from ..state import partitioning_of, redis_client, redis_keys, settings_of
from ..store.broker import restore_unacked_to_head
from ..store.resize import GateAction, ResizeState, ResizeStore
from .stage import Stage, Verdict

if TYPE_CHECKING:
    from collections.abc import Iterable

    from celery import Celery

    from .runtime import PartitionRuntime

__all__ = ["ResizeGate", "check_recorded_size", "check_recorded_sizes", "resize_gate"]

logger = logging.getLogger("celery_partitioning.resize")

#: Seconds between two releases / drain steps of a partition during a resize.
POLL_INTERVAL: Final = 0.1
#: Seconds between two checks that the recorded size is still the one this process runs.
SIZE_CHECK_INTERVAL: Final = 5.0
#: Messages moved off an old partition with no partition of the new size, per poll.
TAKE_BATCH: Final = 200


def check_recorded_size(store: ResizeStore, pool: str, size: int, *, claim: bool = False,
                        command: str = "celery -A <app>") -> ResizeState:
    """The recorded state of ``pool``; refuses a size other than the recorded one. ``claim``:
    record ``size`` when none is, so a later start with another size is refused."""
    outcome, state = store.begin(pool, size, record=False, claim=claim)
    if outcome == "conflict":
        raise PartitionConfigError(
            f"pool {pool!r} is being resized from {state.previous} to {state.size} partitions "
            f"but this worker runs it with {size} (setting partitioning_pools): start the "
            f"workers with {state.size} (see `{command} partitioning status`)")
    if outcome == "mismatch":
        raise PartitionConfigError(
            f"pool {pool!r} is recorded with {state.size} partitions but this worker runs it "
            f"with {size} (setting partitioning_pools); without a resize, keys that moved would "
            f"run out of order and messages queued beyond partition {size - 1} would be "
            f"stranded: record the change first with `{command} partitioning resize {pool} "
            f"{size} --from {state.size}`, or set the pool back to {state.size}")
    if outcome == "new":
        logger.info("pool %s: partition count %d recorded (a change needs `partitioning "
                    "resize`)", pool, size)
    if state.in_flight:
        logger.warning("pool %s: resize from %d to %d partitions in flight (since %s): keys "
                       "that moved run after their old partition's backlog", pool,
                       state.previous, state.size, state.started)
    return state


def check_recorded_sizes(app: Celery, pools: Iterable[str], *, command: str = "celery -A <app>",
                         claim: bool = True) -> None:
    """The supervisor's check before it starts children (:func:`check_recorded_size`)."""
    settings = settings_of(app)
    if settings.redis is None:
        return
    client = redis_client(settings.redis)
    try:
        store = ResizeStore(client, redis_keys(app), settings.queue_prefix)
        for pool in sorted(pools):
            check_recorded_size(store, pool, settings.partitions(pool), claim=claim,
                                command=command)
    finally:
        client.close()


class ResizeGate(Stage):
    """Holds moved keys before a message runs; releases them between messages."""

    name = "resize gate"

    def __init__(self, runtime: PartitionRuntime, store: ResizeStore, state: ResizeState) -> None:
        self.runtime = runtime
        self.store = store
        self.requeue = runtime.requeue
        self.size = state.size
        self._next_poll = 0.0
        self._next_size_check = time.monotonic() + SIZE_CHECK_INTERVAL
        self._follow(state)

    def _follow(self, state: ResizeState) -> None:
        """Take the recorded resize (if any) as this partition's own."""
        self.previous = state.previous
        self.drained_here = self.runtime.index in state.drained
        #: Old partitions with no partition of the new size that this one empties.
        self.orphans = ([p for p in range(self.size, state.previous)
                         if p % self.size == self.runtime.index]
                        if state.previous is not None else [])
        self._recovered: set[int] = set()

    # -- the gate ---------------------------------------------------------------------------
    def before(self, msg: PartitionMessage) -> Verdict:
        previous = self.previous
        if previous is None:
            return Verdict.RUN
        runtime = self.runtime
        key, pool, task_id = msg.partition_key, msg.partition_pool, msg.task_id
        if key is None or pool != runtime.pool or task_id is None:
            return Verdict.RUN
        here, stamp = runtime.index, msg.partition_count
        new = partition_for(key, self.size)
        old = partition_for(key, previous)
        mark = here if here < previous and not self.drained_here else None
        action: GateAction
        if stamp == self.size:
            if new != here:
                return Verdict.RUN  # not this partition's under any size: the misroute guard
            action = "new" if old != here else "mark"
            if action == "mark" and mark is None:
                return Verdict.RUN  # a key that did not move: no round trip
        elif stamp == previous:
            if new == here and (old == here or self.requeue.at_head):
                return Verdict.RUN  # runs here (a key that did not move, or one released here)
            # published releases are counted back in
            action = "new" if new == here else "old"
        else:
            action, old = "unplaced", -1
        verdict = self.store.gate(pool, key, task_id, msg.raw(), action, old=old, new=new,
                                  mark=mark, requeue=self.requeue, here=here)
        if verdict == "over":
            self._over()
            return Verdict.RUN
        if mark is not None and action in ("new", "mark") and verdict != "released":
            self.drained_here = True
        if verdict in ("run", "released"):
            return Verdict.RUN
        if action == "unplaced":
            logger.error("%s message %s (task %s, key %r) is stamped with %r partitions, neither "
                         "the pool's previous %d nor its current %d: the key is held here, in "
                         "order, and none of its messages runs until an operator deals with it",
                         runtime.label, task_id, msg.task_name, key, stamp, previous, self.size)
        else:
            logger.info("%s key %r (task %s) %s", runtime.label, key, task_id, {
                "moved": f"set aside for partition {new}, which runs it once partition {old} "
                         "is drained",
                "held": f"held here, in order, until old partition {old} is drained",
                "duplicate": "set aside already (a redelivery): acked"}.get(verdict, verdict))
        msg.ack()
        return Verdict.TAKEN

    def _over(self) -> None:
        if self.previous is not None:
            logger.info("%s resize of pool %s to %d partitions is over", self.runtime.label,
                        self.runtime.pool, self.size)
        self.previous = None
        self.orphans = []

    # -- between two messages ---------------------------------------------------------------
    def between(self, idle: bool) -> float | None:
        now = time.monotonic()
        if now >= self._next_size_check:
            self._next_size_check = now + SIZE_CHECK_INTERVAL
            self._check_size()
        if self.previous is None or now < self._next_poll:
            return None
        self._next_poll = now + POLL_INTERVAL
        runtime = self.runtime
        broker = runtime.broker
        here, pool = runtime.index, runtime.pool
        for old in list(self.orphans):
            if self._still_consumed(old):
                continue  # its old-size worker has not stopped yet (or its lease not expired)
            if self._take(old) if broker is not None else self._take_published(old):
                self.orphans.remove(old)
        old_list: str | None = None
        if here < self.previous and not self.drained_here:
            if broker is not None:
                old_list = broker.queue_list(runtime.queue)
            elif idle and _declared(runtime, here)[0] == 0:
                # a whole fetch wait without a delivery, nothing ready: no old-size message left
                self.store.mark_drained(pool, here)
                self.drained_here = True
        in_flight, released = self.store.poll(
            pool, here, broker.queue_list(runtime.queue) if broker is not None else None,
            old_list, requeue=self.requeue)
        if released:
            logger.info("%s released %d message(s) of keys whose old partition is drained "
                        "(%s %s, in order)", runtime.label, released,
                        "at the head of" if broker is not None else "published to",
                        runtime.queue)
        if in_flight and self.store.finish(pool, self.previous, self.size):
            in_flight = False
        if not in_flight:
            self._over()
        return None

    def _check_size(self) -> None:
        state = self.store.recent_state(self.runtime.pool, SIZE_CHECK_INTERVAL)
        if state is not None and state.size == self.size and state.in_flight \
                and self.previous is None:
            logger.warning("%s a resize of pool %s from %d to %d partitions was recorded after "
                           "this worker started with %d: keys that moved are held from now on "
                           "(record a resize before starting the workers of the new size)",
                           self.runtime.label, self.runtime.pool, state.previous, state.size,
                           self.size)
            self._follow(state)
        if state is not None and state.size != self.size:
            logger.critical("%s pool %s was resized to %d partitions; this worker runs it with "
                            "%d: stopping (restart it with the new setting)", self.runtime.label,
                            self.runtime.pool, state.size, self.size)
            compat.request_warm_stop()

    def _still_consumed(self, old: int) -> bool:
        """Whether an old-size worker still consumes old partition ``old`` (its lease held, or
        its queue has a consumer): emptying it under that worker could reorder or repeat."""
        runtime = self.runtime
        queue = runtime.settings.queue_name(runtime.pool, old)
        if runtime.broker is not None:
            return bool(runtime.redis.exists(runtime.keys.lease(queue)))
        _ready, consumers = _declared(runtime, old)
        return bool(consumers)

    def _destination(self, headers: Any) -> tuple[str, int]:
        """A message's key and partition of the new size ("" and this one: not keyed)."""
        key = headers.get(HEADER_KEY) if isinstance(headers, dict) else None
        if not isinstance(key, str) or not key:
            return "", self.runtime.index
        return key, partition_for(key, self.size)

    def _take_published(self, old: int) -> bool:
        """:meth:`_take` on RabbitMQ: ``basic.get``, into the key's moved list, then ack."""
        runtime = self.runtime
        assert self.previous is not None
        queue = partitioning_of(runtime.app).router.queue(runtime.pool, old)
        with runtime.app.connection_for_read() as conn:
            bound = queue(conn.default_channel)
            for _ in range(TAKE_BATCH):
                try:
                    message = bound.get(
                        no_ack=False, accept=runtime.app.conf.accept_content)
                except conn.channel_errors as exc:
                    if getattr(exc, "code", None) != 404:
                        raise  # not "drained": the thread stops, its process is restarted
                    message = None  # never declared: nothing to drain
                if message is None:
                    self.store.mark_drained(runtime.pool, old)
                    logger.info("%s old partition %d of pool %s is drained", runtime.label,
                                old, runtime.pool)
                    return True
                key, new = self._destination(message.headers)
                raw = raw_message_of(message)
                self.store.gate(runtime.pool, key, raw_message_id(raw), raw, "old", old=old,
                                new=new, mark=None)
                message.ack()
        return False

    def _take(self, old: int) -> bool:
        """Move up to a batch of old partition ``old``'s messages; True once it is drained."""
        runtime = self.runtime
        broker = runtime.broker
        assert broker is not None and self.previous is not None
        queue = runtime.settings.queue_name(runtime.pool, old)
        source = broker.queue_list(queue)
        if old not in self._recovered:
            # what a killed worker of the old size held goes back to the head first
            restore_unacked_to_head(broker, queue, runtime.keys.in_transit(queue))
            self._recovered.add(old)
        moved = 0
        while moved < TAKE_BATCH:
            raw = broker.client.lindex(source, -1)
            if raw is None:
                if self.store.take(runtime.pool, source, old, None) == 2:
                    logger.info("%s old partition %d of pool %s is drained", runtime.label,
                                old, runtime.pool)
                    return True
                continue
            payload = decode_raw(raw)
            headers = payload.get("headers") if payload is not None else None
            key, new = self._destination(headers)
            stamp = headers.get(HEADER_COUNT) if isinstance(headers, dict) else None
            task_id = raw_message_id(raw)
            if stamp != self.previous:
                logger.warning("%s message %s on old partition %d is stamped with %r "
                               "partitions: moved to partition %d all the same",
                               runtime.label, task_id, old, stamp, new)
            moved += self.store.take(runtime.pool, source, old, raw, task_id=task_id, key=key,
                                     new=new)
        return False


def _declared(runtime: PartitionRuntime, index: int) -> tuple[int | None, int]:
    """Messages ready (not delivered; None if unknown) in partition ``index``'s RabbitMQ
    queue, and its consumers."""
    queue = runtime.settings.queue_name(runtime.pool, index)
    with runtime.app.connection_for_read() as conn:
        try:
            _name, ready, consumers = conn.default_channel.queue_declare(queue=queue,
                                                                         passive=True)
        except conn.channel_errors:
            return None, 0
    return int(ready), int(consumers)


def resize_gate(runtime: PartitionRuntime, store: ResizeStore,
                state: ResizeState) -> ResizeGate | None:
    """The resize gate of a partition, or None where its script cannot push onto the queue
    (a Redis broker apart from the store: a resize in flight is only reported)."""
    if runtime.broker is not None and not runtime.requeue.at_head:
        if state.in_flight:
            logger.error("%s resize of pool %s from %d to %d partitions in flight, but with this "
                         "broker and store moved keys are not held back: their old-size messages "
                         "are re-published behind newer ones", runtime.label, runtime.pool,
                         state.previous, state.size)
        return None
    return ResizeGate(runtime, store, state)
