"""The Orders context's write side: commands in, events out (in memory, like a request handler).

``CreateOrder``, ``AddItem``, ``RemoveItem`` and ``SubmitOrder`` are validated against the
order's current state and turned into ``OrderCreated``, ``ItemAdded``, ``ItemRemoved`` and
``OrderSubmitted``. Every event carries the ids its projections are keyed by: ``order_id``,
``customer_id``, ``correlation_id`` (and ``sku`` / ``day`` where they apply).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["OrderBook", "CommandRejected", "correlation_of"]


class CommandRejected(ValueError):
    """A command that the order's state does not allow."""


def correlation_of(order_id: str) -> str:
    """The saga correlation id of an order: Orders and Inventory events share it."""
    return f"corr-{order_id}"


@dataclass
class _Order:
    customer_id: str
    status: str = "open"
    lines: dict[str, dict[str, int]] = field(default_factory=dict)


class OrderBook:
    """Orders and product prices; each method is one command and returns its events."""

    def __init__(self, prices: dict[str, int]) -> None:
        self.prices = dict(prices)
        self.orders: dict[str, _Order] = {}

    def _open(self, order_id: str) -> _Order:
        order = self.orders.get(order_id)
        if order is None:
            raise CommandRejected(f"order {order_id} does not exist")
        if order.status != "open":
            raise CommandRejected(f"order {order_id} is {order.status}")
        return order

    def _event(self, kind: str, order_id: str, **data: Any) -> dict[str, Any]:
        order = self.orders[order_id]
        return {"type": kind, "order_id": order_id, "customer_id": order.customer_id,
                "correlation_id": correlation_of(order_id), **data}

    def create_order(self, order_id: str, customer_id: str) -> list[dict[str, Any]]:
        if order_id in self.orders:
            raise CommandRejected(f"order {order_id} exists")
        self.orders[order_id] = _Order(customer_id)
        return [self._event("OrderCreated", order_id)]

    def add_item(self, order_id: str, sku: str, qty: int) -> list[dict[str, Any]]:
        order = self._open(order_id)
        if qty <= 0 or sku not in self.prices:
            raise CommandRejected(f"cannot add {qty} x {sku}")
        price = self.prices[sku]
        line = order.lines.setdefault(sku, {"qty": 0, "price_cents": price})
        line["qty"] += qty
        line["price_cents"] = price
        return [self._event("ItemAdded", order_id, sku=sku, qty=qty, price_cents=price)]

    def remove_item(self, order_id: str, sku: str) -> list[dict[str, Any]]:
        order = self._open(order_id)
        line = order.lines.pop(sku, None)
        if line is None:
            raise CommandRejected(f"order {order_id} has no {sku}")
        return [self._event("ItemRemoved", order_id, sku=sku, qty=line["qty"])]

    def submit_order(self, order_id: str, day: str) -> list[dict[str, Any]]:
        order = self._open(order_id)
        if not order.lines:
            raise CommandRejected(f"order {order_id} is empty")
        order.status = "submitted"
        total = sum(line["qty"] * line["price_cents"] for line in order.lines.values())
        units = sum(line["qty"] for line in order.lines.values())
        lines = {sku: line["qty"] for sku, line in order.lines.items()}
        return [self._event("OrderSubmitted", order_id, day=day, total_cents=total, units=units,
                            lines=lines)]

    def change_price(self, sku: str, price_cents: int) -> list[dict[str, Any]]:
        """A catalog change: later ``ItemAdded`` events carry the new price (no event itself)."""
        self.prices[sku] = price_cents
        return []
