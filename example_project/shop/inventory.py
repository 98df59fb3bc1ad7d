"""The Inventory context: ``ReserveInventory``, a DCB command on the scope of its reservation.

The handler reads the events of the scope ``tenant:<tenant>:reservation:<id>``, decides, and
appends ``InventoryReserved`` at the version it read. If another writer appended to the scope
in between, the append conflicts (unique scope version) and raises ``DCBConflict``;
``with_dcb_retry`` retries the command on the scope's ``dcb`` partition (key
``dcb:tenant:<tenant>:reservation:<id>``), where every operation on that scope runs one at a time.

The demo marks a few commands ``contend=True``: on their first attempt a concurrent writer
(as a support agent annotating the reservation would) appends ``ReservationNoted`` to the
scope between the read and the append, so those commands really conflict and are retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import current_app, shared_task
from django.db import IntegrityError

from celery_partitioning import create_scope_key
from celery_partitioning.dcb import DCBConflict, with_dcb_retry

from .dblock import write_transaction
from .events import append_to_scope, publish
from .models import InventoryReservation, StoredEvent
from .progress import progress_of

__all__ = ["reserve_inventory", "reservation_scope"]


def reservation_scope(args: Mapping[str, Any]) -> str:
    """The DCB scope of a reservation command: ``tenant:<tenant_id>:reservation:<reservation_id>``."""
    return create_scope_key(args["tenant_id"], "reservation", args["reservation_id"])


@shared_task(name="shop.reserve_inventory")
@with_dcb_retry(scope_key=reservation_scope, max_attempts=5)
def reserve_inventory(tenant_id: str, reservation_id: str, order_id: str, correlation_id: str,
                      lines: dict[str, int], contend: bool = False) -> str:
    scope = reservation_scope({"tenant_id": tenant_id, "reservation_id": reservation_id})
    history = list(StoredEvent.objects.filter(scope=scope).order_by("scope_version"))
    done = [e for e in history if e.type == "InventoryReserved"]
    if done:
        # Decided by an earlier attempt whose publish may not have happened: publish again
        # (the saga projection takes the same event twice to the same state).
        publish({**done[0].data, "position": done[0].position})
        return "already reserved"
    version = len(history)
    base = {"order_id": order_id, "correlation_id": correlation_id, "reservation_id": reservation_id,
            "customer_id": "", "tenant_id": tenant_id}
    if contend and not any(e.type == "ReservationNoted" for e in history):
        with write_transaction():  # the other writer, between our read and our append
            append_to_scope(scope, version, {**base, "type": "ReservationNoted",
                                             "note": "customer asked for gift wrapping"})
    event = {**base, "type": "InventoryReserved", "lines": dict(lines), "units": sum(lines.values())}
    try:
        with write_transaction():
            stored = append_to_scope(scope, version, event)
            InventoryReservation.objects.update_or_create(
                reservation_id=reservation_id,
                defaults={"order_id": order_id, "status": "reserved", "lines": dict(lines),
                          "units": event["units"]})
    except IntegrityError:
        progress_of(current_app._get_current_object()).count("dcb_conflicts")
        actual = StoredEvent.objects.filter(scope=scope).count()
        raise DCBConflict(scope, expected_version=version, actual_version=actual) from None
    publish(stored)
    return "reserved"
