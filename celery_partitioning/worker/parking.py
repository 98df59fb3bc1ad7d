"""The parking gate: a message whose key is parked is set aside in order instead of running."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..deadletters import DeadLetterStore, GateResult, Publish
from .runtime import GateMessage

if TYPE_CHECKING:
    from .fetch import Registration
    from .runtime import PartitionRuntime

__all__ = ["InFlight", "InFlightEntry", "ParkingGate", "raw_payload"]

logger = logging.getLogger("celery_partitioning.parking")

#: More messages than this passed the gate without finishing: forget the oldest.
MAX_INFLIGHT: Final = 64
#: More verdicts than this decided at receive and not yet asked for: forget the oldest.
MAX_DECIDED: Final = 64


@dataclass(frozen=True)
class InFlightEntry:
    """What the gate saw of a message that it let run (for its dead letter, if it fails)."""

    pool: str
    key: str
    raw: str
    #: The task id's in-place retry record (JSON) as the gate read it, None if it had none.
    attempts: str | None = None
    #: False when the gate did not read the attempt record (the retry code reads it itself).
    attempts_read: bool = False
    #: The message belongs to a replay in flight: the store must hear when it is done.
    replaying: bool = True


class InFlight:
    """Messages let through by the gate, by task id, until they finish (one per process)."""

    def __init__(self) -> None:
        self._entries: dict[str, InFlightEntry] = {}

    def put(self, task_id: str, entry: InFlightEntry) -> None:
        while len(self._entries) >= MAX_INFLIGHT:
            self._entries.pop(next(iter(self._entries)))
        self._entries[task_id] = entry

    def get(self, task_id: str) -> InFlightEntry | None:
        return self._entries.get(task_id)

    def pop(self, task_id: str) -> InFlightEntry | None:
        return self._entries.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._entries)


def raw_payload(message: Any) -> str:
    """The message as kombu's Redis transport stores it (JSON text), to re-queue it unchanged.

    Redis (virtual) transport messages carry their payload; others (py-amqp) are rebuilt in
    the same shape, with the body base64-encoded.
    """
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
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


class ParkingGate:
    """A runtime gate: set aside (and ack) messages of parked keys; remember the others.

    Idempotent by task id: a message stored but not acked (a crash in between) is
    recognized when it comes back, and only acked.

    On a Redis broker whose Redis holds the store, :meth:`register` is the reliable fetch's
    ``Register``: the gate is decided in the very script that records the message as
    unacked, so a message that runs costs no round trip of the gate's own.
    """

    def __init__(self, runtime: PartitionRuntime, store: DeadLetterStore,
                 inflight: InFlight, publish: Publish | None = None) -> None:
        self.runtime = runtime
        self.store = store
        self.inflight = inflight
        #: How deferred messages are re-queued (None: Redis head push; see deadletters).
        self.publish = publish
        #: Verdicts decided at receive (and the raw payload), by delivery tag, until asked.
        self._decided: dict[Any, tuple[GateResult, str]] = {}

    def _applies(self, message: GateMessage) -> bool:
        """Would this gate be asked about ``message`` (by the gate chain, after the guard)?"""
        from .guard import belongs_here

        pool, key = message.partition_pool, message.partition_key
        return (pool is not None and key is not None and message.task_id is not None
                and message.task_name in self.runtime.app.tasks
                and belongs_here(self.runtime, pool, key))

    def register(self, registration: Registration) -> None:
        """Record a fetched message as unacked and, if the gate will be asked, decide it too."""
        message = GateMessage(registration.message, str(registration.message.headers.get("task")))
        key, pool, task_id = message.partition_key, message.partition_pool, message.task_id
        if key is None or pool is None or task_id is None or not self._applies(message):
            with self.runtime.broker.client.pipeline() as pipe:  # the fetch's own transaction
                registration.queue(pipe)
                pipe.execute()
            return
        raw = raw_payload(message.message)
        result = self.store.receive(pool, key, task_id, raw, self.runtime.queue,
                                    registration=registration)
        while len(self._decided) >= MAX_DECIDED:
            self._decided.pop(next(iter(self._decided)))
        self._decided[registration.delivery_tag] = (result, raw)

    def __call__(self, message: GateMessage) -> bool:
        key, pool, task_id = message.partition_key, message.partition_pool, message.task_id
        if key is None or pool is None or task_id is None:
            return False
        decided = self._decided.pop(getattr(message.message, "delivery_tag", None), None)
        if decided is not None:
            result, raw = decided
        else:
            raw = raw_payload(message.message)
            result = self.store.check(pool, key, task_id, raw, self.runtime.queue,
                                      publish=self.publish)
        verdict = result.verdict
        if verdict == "run":
            self.inflight.put(task_id, InFlightEntry(pool, key, raw, attempts=result.attempts,
                                                     attempts_read=True,
                                                     replaying=result.replaying))
            return False
        what = {"parked": "is parked: message set aside",
                "deferred": "is being replayed: newer message deferred behind the replay",
                "duplicate": "is parked: message already stored"}[verdict]
        logger.warning("%s[%s]: key %r of pool %s %s", message.task_name, task_id, key, pool, what)
        message.ack()
        return True
