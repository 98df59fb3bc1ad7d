"""The transactional outbox: a task call stored in the caller's transaction, published after commit.

``publish(sig)`` / ``publish_many(sigs)`` inside ``transaction.atomic()`` run Celery's own
``Task.apply_async`` with a *capturing producer*: routing, checks, task id, headers and body
are exactly ``apply_async``'s, and so are its errors. The message is inserted into the outbox
table in the same transaction instead of being sent; the relay (``relay.py``) publishes
committed rows in ``id`` order and deletes them once the broker confirmed them.

Commit order: on PostgreSQL every outbox insert first takes a transaction-level advisory lock,
so outbox transactions are serialized from their first ``publish`` to their commit, their
rows' ids follow commit order, and every key's messages stay in order across transactions.
Hence: publish late in a transaction, so the lock is held briefly. The same statement sends
``NOTIFY`` (delivered at commit) to wake the relay. SQLite has one writer at a time already.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from celery.canvas import Signature
from django.db import connections, transaction
from kombu.serialization import dumps

from ...compat import task_exec_options
from ...errors import PartitionConfigError, PartitioningError, PartitionKeyError
from ...router import HEADER_KEY

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from .models import OutboxMessage

__all__ = ["publish", "publish_many", "NOTIFY_CHANNEL", "LOCK_ID", "SUPPORTED_VENDORS"]

#: The PostgreSQL ``LISTEN``/``NOTIFY`` channel the relay waits on.
NOTIFY_CHANNEL: Final = "celery_partitioning_outbox"

#: The advisory lock id that serializes outbox writers on PostgreSQL (a fixed 63-bit number
#: derived from the channel name, so it does not collide with small application lock ids).
LOCK_ID: Final = zlib.crc32(NOTIFY_CHANNEL.encode()) << 31 | 0x4F42

#: Database vendors whose write order the outbox relies on (see the module docstring).
SUPPORTED_VENDORS: Final = ("postgresql", "sqlite")

#: Call options that would send the message another way than through the outbox.
_REFUSED_OPTIONS: Final = frozenset({"producer", "connection", "publisher"})


class _Connection:
    """What ``Celery.send_task`` asks of the producer's connection: nothing that connects."""

    @staticmethod
    @contextlib.contextmanager
    def _reraise_as_library_errors() -> Iterator[None]:
        yield


class _CapturingProducer:
    """Stands in for kombu's ``Producer`` in ``apply_async(producer=...)``: the first
    ``publish`` (the task message) is kept, not sent; a later one (the ``task-sent`` event
    when ``task_send_sent_event`` is on) is dropped: the event would come before the task
    exists on the broker."""

    def __init__(self) -> None:
        self.connection = _Connection()
        self.captured: dict[str, Any] | None = None

    @property
    def channel(self) -> Any:
        raise PartitionConfigError(
            "outbox.publish cannot declare a reply queue for the rpc:// result backend at "
            "publish time; use another result backend (or ignore_result) for outbox tasks")

    def publish(self, body: Any, **kwargs: Any) -> None:
        if self.captured is None:
            self.captured = {"body": body, **kwargs}


def _check_transaction(using: str | None) -> str:
    alias = using or "default"
    connection = transaction.get_connection(alias)
    if not connection.in_atomic_block:
        raise PartitionKeyError(
            f"outbox.publish must be called inside transaction.atomic() (database {alias!r} "
            "has no transaction open): the message is stored in your transaction and "
            "published after it commits. Wrap the writes and the publish in "
            "transaction.atomic(), or use apply_async to publish at once")
    if connection.vendor not in SUPPORTED_VENDORS:
        raise PartitionConfigError(
            f"the outbox supports PostgreSQL and SQLite, not {connection.vendor} (database "
            f"{alias!r}): it relies on their write order to relay messages in commit order")
    return alias


def _single_call(position: int, sig: Any) -> Signature:
    if not isinstance(sig, Signature) or sig.get("subtask_type") is not None:
        kind = getattr(sig, "subtask_type", None) or type(sig).__name__
        raise PartitionKeyError(
            f"outbox call {position}: not a single task call ({kind}); the outbox takes task "
            "signatures such as task.s(...)")
    refused = _REFUSED_OPTIONS.intersection(sig.options or {})
    if refused:
        raise PartitionKeyError(
            f"outbox call {position} ({sig.task}): the option(s) {', '.join(sorted(refused))} "
            "would publish around the outbox; leave them out")
    return sig


def _capture(sig: Signature) -> tuple[AsyncResult, dict[str, Any]]:
    """Run ``sig.apply_async`` with a capturing producer: its checks, its message."""
    producer = _CapturingProducer()
    result = sig.apply_async(producer=producer)
    if producer.captured is None:  # pragma: no cover - apply_async always publishes
        raise PartitionConfigError(f"task {sig.task}: apply_async published nothing to capture")
    return result, producer.captured


def _row(captured: dict[str, Any]) -> OutboxMessage:
    from .models import OutboxMessage

    kw = dict(captured)
    body = kw.pop("body")
    headers = dict(kw.pop("headers", None) or {})
    content_type, content_encoding, data = dumps(body, serializer=kw.pop("serializer", None))
    exchange = kw.pop("exchange", "") or ""
    declare = next((_declaration(q) for q in kw.pop("declare", None) or ()), None)
    delivery_mode = kw.pop("delivery_mode", None)
    compression = kw.pop("compression", None) or ""
    routing_key = kw.pop("routing_key", "") or ""
    for sent_another_way in ("retry", "retry_policy", "timeout", "confirm_timeout"):
        kw.pop(sent_another_way, None)
    properties = {k: v for k, v in kw.items() if v is not None}
    key = headers.get(HEADER_KEY)
    return OutboxMessage(
        task_name=str(headers.get("task", "")), task_id=str(headers.get("id", "")),
        partition_key=str(key) if key is not None else "",
        exchange=getattr(exchange, "name", exchange) or "", routing_key=routing_key,
        declare=declare, headers=headers, properties=properties,
        body=data if isinstance(data, bytes) else data.encode(content_encoding),
        content_type=content_type, content_encoding=content_encoding,
        compression=compression, delivery_mode=delivery_mode)


def _declaration(queue: Any) -> dict[str, Any] | None:
    """A kombu Queue as JSON (``Queue.as_dict``); the relay declares it as apply_async would."""
    as_dict = getattr(queue, "as_dict", None)
    if as_dict is None or getattr(queue, "bindings", None):
        raise PartitionKeyError(
            f"the outbox cannot store the declaration of queue {queue!r} (bindings); "
            "publish this call with apply_async")
    found: dict[str, Any] = as_dict(recurse=True)
    return found


def _lock_and_notify(alias: str) -> None:
    """Serialize outbox writers until commit (PostgreSQL) and wake the relay at commit."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return  # SQLite: one writer at a time already
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s), pg_notify(%s, '')",
                       [LOCK_ID, NOTIFY_CHANNEL])


def publish(signature: Signature, *, using: str | None = None) -> AsyncResult:
    """Store one task call in the outbox of the open transaction of database ``using``; routed,
    checked (raising what ``apply_async`` raises) and given its task id as ``apply_async``
    would; published after the commit, never on a rollback."""
    return _store([_single_call(0, signature)], using, name_positions=False)[0]


def publish_many(signatures: Iterable[Signature], *, using: str | None = None) -> list[AsyncResult]:
    """Store many task calls in the outbox of the open transaction, in order (one insert).

    Every call is checked before anything is stored: a bad one raises ``PartitionKeyError``
    (``PartitionConfigError`` for a bad setting) naming its position, as
    ``celery_partitioning.publish_many`` does. Under ``task_always_eager`` the calls are
    checked now and run eagerly, in order, when the transaction commits.
    """
    sigs = [_single_call(i, sig) for i, sig in enumerate(signatures)]
    return _store(sigs, using, name_positions=True)


def _store(sigs: list[Signature], using: str | None, *, name_positions: bool) -> list[AsyncResult]:
    alias = _check_transaction(using)
    if not sigs:
        return []
    if sigs[0].app.conf.task_always_eager:
        return _eager(sigs, alias)
    results, rows = [], []
    for position, sig in enumerate(sigs):
        try:
            result, captured = _capture(sig)
            rows.append(_row(captured))
        except Exception as exc:
            if not name_positions:
                raise
            kind = PartitionConfigError if isinstance(exc, PartitionConfigError) else PartitionKeyError
            reason = str(exc) if isinstance(exc, PartitioningError) else f"{type(exc).__name__}: {exc}"
            if "nothing was published" not in reason:
                reason += "; nothing was stored"
            raise kind(f"outbox call {position} ({sig.task}): {reason}") from exc
        results.append(result)
    from .models import OutboxMessage

    _lock_and_notify(alias)
    OutboxMessage.objects.using(alias).bulk_create(rows)
    return results


def _eager(sigs: list[Signature], alias: str) -> list[AsyncResult]:
    """Eager mode: check each call as its publish would (the app's router), run it at commit."""
    for position, sig in enumerate(sigs):
        task = sig.type
        options = dict(task_exec_options(task), **(sig.options or {}))
        try:
            sig.app.amqp.router.route(options, sig.task, tuple(sig.args or ()),
                                      dict(sig.kwargs or {}), task)
        except PartitionKeyError as exc:
            raise PartitionKeyError(f"outbox call {position} ({sig.task}): {exc}") from exc
    ids = [sig.freeze().id for sig in sigs]
    transaction.on_commit(partial(_run_eagerly, sigs), using=alias)
    return [sig.app.AsyncResult(task_id) for sig, task_id in zip(sigs, ids, strict=True)]


def _run_eagerly(sigs: list[Signature]) -> None:
    for sig in sigs:
        sig.apply_async()
