"""The event store (append, with a DCB scope check) and the publishing of events to projections."""

from __future__ import annotations

from typing import Any

from celery.canvas import Signature

from celery_partitioning import publish_many

from .dblock import write_transaction
from .models import StoredEvent
from .projections import by_name

__all__ = ["append", "append_to_scope", "publish", "signatures_for", "stored_events"]


def _stream_of(event: dict[str, Any]) -> str:
    if "reservation_id" in event:
        return f"Reservation:{event['reservation_id']}"
    return f"Order:{event['order_id']}"


def append(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append events (one transaction); return them with their ``position``."""
    stored: list[dict[str, Any]] = []
    with write_transaction():
        for event in events:
            row = StoredEvent.objects.create(type=event["type"], stream=_stream_of(event),
                                             data=event)
            stored.append({**event, "position": row.position})
    return stored


def append_to_scope(scope: str, expected_version: int, event: dict[str, Any]) -> dict[str, Any]:
    """Append one event to a DCB scope at ``expected_version`` (the count of its events read).

    A writer that appended to the scope since then holds that version: the unique
    (scope, scope_version) constraint raises ``IntegrityError`` (the caller's conflict).
    Call it inside ``write_transaction()``.
    """
    row = StoredEvent.objects.create(type=event["type"], stream=_stream_of(event), scope=scope,
                                     scope_version=expected_version, data=event)
    return {**event, "position": row.position}


def stored_events() -> list[dict[str, Any]]:
    """Every stored event, in position order."""
    return [{**row.data, "position": row.position} for row in StoredEvent.objects.order_by("position")]


def signatures_for(event: dict[str, Any]) -> list[Signature]:
    """The task calls of the projections one stored event updates, in a fixed order."""
    from .tasks import PROJECTION_TASKS

    calls = []
    for name, (task, key_field) in PROJECTION_TASKS.items():
        if event["type"] not in by_name(name).events:
            continue
        kwargs: dict[str, Any] = {"event": event}
        if key_field is not None:
            kwargs[key_field] = event[key_field]
        calls.append(task.s(**kwargs))
    return calls


def publish(event: dict[str, Any]) -> int:
    """Publish one stored event to the tasks of the projections it updates; return how many."""
    calls = signatures_for(event)
    publish_many(calls)
    return len(calls)
