"""The example shop's projections are order-sensitive, and the demo's verification sees it (no broker)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "example_project"


@pytest.fixture(autouse=True, scope="module")
def _shop_importable() -> Iterator[None]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLE))


def _events(n: int = 600) -> tuple[list[dict[str, Any]], Any, Any]:
    """The demo's stream run through the Orders write side, numbered like the event store."""
    from shop.orders import OrderBook
    from shop.stream import plan_stream

    plan = plan_stream(n)
    book = OrderBook(plan.prices)
    handlers = {"CreateOrder": book.create_order, "AddItem": book.add_item,
                "RemoveItem": book.remove_item, "SubmitOrder": book.submit_order,
                "ChangePrice": book.change_price}
    events: list[dict[str, Any]] = []
    for command in plan.commands:
        for event in handlers[command.name](**command.args):
            events.append({**event, "position": len(events) + 1})
            if event["type"] == "OrderSubmitted":  # what the reservation handler appends
                events.append({"type": "InventoryReserved", "order_id": event["order_id"],
                               "correlation_id": event["correlation_id"], "customer_id": "",
                               "reservation_id": f"res-{event['order_id']}", "tenant_id": "t",
                               "lines": event["lines"], "units": event["units"],
                               "position": len(events) + 1})
    return events, plan, book


def test_the_stream_is_realistic_and_reproducible() -> None:
    from shop.stream import plan_stream

    events, plan, _ = _events(3000)
    kinds = [e["type"] for e in events]
    # thousands of events, hundreds of orders, dozens of customers, items added and removed
    assert len(events) >= 2500
    assert 250 <= plan.orders <= 400 and 24 <= plan.customers <= 60
    assert kinds.count("ItemRemoved") >= 100 and kinds.count("OrderSubmitted") >= 200
    # a few reservations meet a concurrent writer (the DCB conflicts of the demo)
    assert 3 <= len(plan.contended) <= 20
    # a removed item re-added to the same order happens (the seed's Remove/Add story)
    seen: dict[tuple[str, str], list[str]] = {}
    for e in events:
        if e["type"] in ("ItemAdded", "ItemRemoved"):
            seen.setdefault((e["order_id"], e["sku"]), []).append(e["type"])
    assert any(v[:3] == ["ItemAdded", "ItemRemoved", "ItemAdded"] for v in seen.values())
    assert plan_stream(3000).commands == plan.commands


def test_in_order_replay_matches_the_write_side() -> None:
    from shop.verify import replay

    events, _, book = _events()
    rows = replay(events)
    for order_id, order in book.orders.items():
        summary = rows["orderSummary"][order_id]
        assert summary["lines"] == order.lines
        assert summary["status"] == ("submitted" if order.status == "submitted" else "open")
    submitted = [e for e in events if e["type"] == "OrderSubmitted"]
    assert sum(r["orders"] for r in rows["dailySalesSummary"].values()) == len(submitted)
    assert sum(r["revenue_cents"] for r in rows["dailySalesSummary"].values()) == sum(
        e["total_cents"] for e in submitted)
    assert all(r["status"] == "ready_to_ship" for r in rows["orderWithInventory"].values())


def _swap_first(events: list[dict[str, Any]], first: str, second: str,
                same: tuple[str, ...]) -> list[dict[str, Any]]:
    """The stream with the first ``first`` event and the next ``second`` of the same ids swapped."""
    for i, a in enumerate(events):
        if a["type"] != first:
            continue
        for j in range(i + 1, len(events)):
            b = events[j]
            if b["type"] == second and all(a[k] == b[k] for k in same):
                swapped = list(events)
                swapped[i], swapped[j] = b, a
                return swapped
    raise AssertionError(f"no {first} followed by {second}")


def test_item_removed_before_item_added_leaves_a_phantom_line_and_is_reported() -> None:
    from shop.verify import compare, replay

    events, _, _ = _events()
    # Given the seed's story: ItemRemoved handled before the ItemAdded it removes
    swapped = _swap_first(events, "ItemAdded", "ItemRemoved", ("order_id", "sku"))
    # When both orders of the same events are projected and compared
    checks = {c.name: c for c in compare(replay(events), replay(swapped))}
    # Then the order summary has a phantom line, and the verification says so
    bad = checks["orderSummary"].mismatches
    assert len(bad) == 1
    assert set(bad[0].actual["lines"]) - set(bad[0].expected["lines"])  # type: ignore[index]
    assert "lines" in bad[0].describe()
    # and the catalog lost the removal (units never go below zero)
    assert checks["productCatalog"].mismatches


def test_a_saga_event_before_its_predecessor_shows_the_wrong_status() -> None:
    from shop.verify import compare, replay

    events, _, _ = _events()
    swapped = _swap_first(events, "OrderSubmitted", "InventoryReserved", ("correlation_id",))
    checks = {c.name: c for c in compare(replay(events), replay(swapped))}
    [bad] = checks["orderWithInventory"].mismatches
    assert bad.expected and bad.actual
    assert (bad.expected["status"], bad.actual["status"]) == ("ready_to_ship", "awaiting_inventory")


def test_two_writers_on_the_global_rollup_lose_an_update_and_it_is_reported() -> None:
    from shop.projections import by_name
    from shop.verify import compare

    events, _, _ = _events()
    daily = by_name("dailySalesSummary")
    a, b = [e for e in events if e["type"] == "OrderSubmitted"][:2]
    assert a["day"] == b["day"]
    # One writer: read, add, write - twice
    sequential = daily.apply(daily.apply(None, a), b)
    # Two writers at once: both read the empty total, the second write wins
    _first_write, second_write = daily.apply(None, a), daily.apply(None, b)
    assert sequential["orders"] == 2 and second_write["orders"] == 1
    checks = {c.name: c for c in compare({"dailySalesSummary": {a["day"]: sequential}},
                                         {"dailySalesSummary": {a["day"]: second_write}})}
    assert len(checks["dailySalesSummary"].mismatches) == 1
    assert sum(len(c.mismatches) for c in checks.values()) == 1


def test_ctrl_c_during_a_class_creation_still_reads_as_an_interrupt() -> None:
    # Given the demo's signal handling, and Ctrl-C landing while Python runs __set_name__ (it
    # happened in CI, during a lazy import building celery.events.Events: Python 3.11 re-raises
    # it as RuntimeError("Error calling __set_name__ ..."))
    import os
    import signal

    from shop import interrupt

    class Trips:
        def __set_name__(self, owner: type, name: str) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    interrupt.INTERRUPTED.clear()
    assert not interrupt.was_interrupted(RuntimeError("the workers could not start"))
    try:
        with pytest.raises(BaseException) as raised, interrupt.signals_as_interrupt():
            type("Events", (), {"Receiver": Trips()})
        # Then whatever came out, the demo takes it for Ctrl-C, not a failure
        assert interrupt.was_interrupted(raised.value)
    finally:
        interrupt.INTERRUPTED.clear()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
