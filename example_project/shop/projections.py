"""The shop's projections: how each read model changes with each event (pure functions).

Each ``apply`` is written the way such handlers usually are: correct when the events of a
row arrive one at a time and in order, and *wrong* otherwise. That is the point of the demo:

* ``orderSummary``: ``OrderCreated`` starts a fresh summary, ``ItemRemoved`` drops a line.
  ``ItemRemoved`` before its ``ItemAdded`` leaves a phantom line; ``OrderCreated`` late wipes lines.
* ``productCatalog``: last price wins; units never go below zero (a removal seen first is lost).
* ``customerOrderHistory``: orders listed in the order they were placed.
* ``orderWithInventory``: ``OrderSubmitted`` sets "awaiting inventory", ``InventoryReserved``
  sets "ready to ship": swapped, an order that is ready reads as waiting.
* ``dailySalesSummary``: a read-modify-write total; two writers at once lose an update.

The workers apply these to database rows (``shop.tasks``); the demo's verification applies
them to dictionaries, sequentially, in event order (``shop.verify``), and compares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Projection", "PROJECTIONS", "projections_for", "by_name", "State", "Event"]

#: An event as published to the projection tasks: ``type``, ``position`` and its data.
Event = Mapping[str, Any]
#: One read-model row's fields, without its primary key.
State = dict[str, Any]


@dataclass(frozen=True)
class Projection:
    """One read model: which events it takes, which row an event touches, how it changes."""

    name: str
    model: str
    events: frozenset[str]
    row_key: Callable[[Event], str]
    apply: Callable[[State | None, Event], State]
    #: The global rollup pauses between reading and writing its row (a slow computation):
    #: harmless with a single writer, lost updates with several.
    slow_write: bool = False


def _recount(state: State) -> State:
    lines: dict[str, dict[str, int]] = state["lines"]
    state["item_count"] = sum(line["qty"] for line in lines.values())
    state["total_cents"] = sum(line["qty"] * line["price_cents"] for line in lines.values())
    return state


def _order_summary(state: State | None, event: Event) -> State:
    kind = event["type"]
    if kind == "OrderCreated":
        return {"customer_id": event["customer_id"], "status": "open", "lines": {},
                "item_count": 0, "total_cents": 0}
    state = dict(state) if state is not None else {
        "customer_id": event["customer_id"], "status": "open", "lines": {},
        "item_count": 0, "total_cents": 0}
    lines = {sku: dict(line) for sku, line in state["lines"].items()}
    state["lines"] = lines
    if kind == "ItemAdded":
        line = lines.setdefault(event["sku"], {"qty": 0, "price_cents": event["price_cents"]})
        line["qty"] += event["qty"]
        line["price_cents"] = event["price_cents"]
        return _recount(state)
    if kind == "ItemRemoved":
        lines.pop(event["sku"], None)
        return _recount(state)
    if kind == "OrderSubmitted":
        state["status"] = "submitted"
        return state
    raise ValueError(f"orderSummary does not handle {kind}")


def _product_catalog(state: State | None, event: Event) -> State:
    state = dict(state) if state is not None else {
        "last_price_cents": 0, "units_in_orders": 0, "times_added": 0}
    if event["type"] == "ItemAdded":
        state["last_price_cents"] = event["price_cents"]
        state["units_in_orders"] += event["qty"]
        state["times_added"] += 1
    else:  # ItemRemoved
        state["units_in_orders"] = max(0, state["units_in_orders"] - event["qty"])
    return state


def _customer_history(state: State | None, event: Event) -> State:
    state = dict(state) if state is not None else {
        "order_ids": [], "last_order_id": "", "orders_submitted": 0, "lifetime_value_cents": 0}
    if event["type"] == "OrderCreated":
        state["order_ids"] = [*state["order_ids"], event["order_id"]]
        state["last_order_id"] = event["order_id"]
    else:  # OrderSubmitted
        state["orders_submitted"] += 1
        state["lifetime_value_cents"] += event["total_cents"]
    return state


def _order_with_inventory(state: State | None, event: Event) -> State:
    state = dict(state) if state is not None else {
        "order_id": event["order_id"], "status": "", "total_cents": 0,
        "reservation_id": "", "reserved_units": 0}
    if event["type"] == "OrderSubmitted":
        state.update(order_id=event["order_id"], status="awaiting_inventory",
                     total_cents=event["total_cents"])
    else:  # InventoryReserved
        state.update(status="ready_to_ship", reservation_id=event["reservation_id"],
                     reserved_units=event["units"])
    return state


def _daily_sales(state: State | None, event: Event) -> State:
    state = dict(state) if state is not None else {"orders": 0, "revenue_cents": 0, "items_sold": 0}
    state["orders"] += 1
    state["revenue_cents"] += event["total_cents"]
    state["items_sold"] += event["units"]
    return state


def _reservation(state: State | None, event: Event) -> State:
    return {"order_id": event["order_id"], "status": "reserved", "lines": dict(event["lines"]),
            "units": event["units"]}


PROJECTIONS: tuple[Projection, ...] = (
    Projection("orderSummary", "OrderSummary",
               frozenset({"OrderCreated", "ItemAdded", "ItemRemoved", "OrderSubmitted"}),
               lambda e: str(e["order_id"]), _order_summary),
    Projection("productCatalog", "ProductCatalog", frozenset({"ItemAdded", "ItemRemoved"}),
               lambda e: str(e["sku"]), _product_catalog),
    Projection("customerOrderHistory", "CustomerOrderHistory",
               frozenset({"OrderCreated", "OrderSubmitted"}),
               lambda e: str(e["customer_id"]), _customer_history),
    Projection("orderWithInventory", "OrderWithInventory",
               frozenset({"OrderSubmitted", "InventoryReserved"}),
               lambda e: str(e["correlation_id"]), _order_with_inventory),
    Projection("dailySalesSummary", "DailySalesSummary", frozenset({"OrderSubmitted"}),
               lambda e: str(e["day"]), _daily_sales, slow_write=True),
    # Written by the DCB command handler itself (shop.inventory), in the same transaction
    # as its event; verified like the others.
    Projection("inventoryReservation", "InventoryReservation", frozenset({"InventoryReserved"}),
               lambda e: str(e["reservation_id"]), _reservation),
)


def projections_for(event_type: str) -> list[Projection]:
    """The projections an event of this type updates."""
    return [p for p in PROJECTIONS if event_type in p.events]


def by_name(name: str) -> Projection:
    for projection in PROJECTIONS:
        if projection.name == name:
            return projection
    raise KeyError(name)
