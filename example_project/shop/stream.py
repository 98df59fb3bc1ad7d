"""A realistic, reproducible command stream: customers filling carts, changing their minds, buying.

A handful of orders are in progress at once (their commands interleave, as requests from
different customers do); each order gets items added, some removed (and some re-added),
and most are submitted. Prices change now and then. A few reservations are marked
``contend``: their DCB append meets a concurrent writer and must be retried.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Command", "StreamPlan", "plan_stream", "EVENTS_PER_ORDER"]

#: About how many events one order produces (created, adds, removes, submitted, reserved).
EVENTS_PER_ORDER = 9.5
#: Orders in progress at the same time.
ACTIVE_ORDERS = 8
#: One reservation in this many meets a concurrent writer (at least one per stream).
CONTEND_EVERY = 40


@dataclass(frozen=True)
class Command:
    name: str
    args: dict[str, Any]


@dataclass
class StreamPlan:
    prices: dict[str, int]
    commands: list[Command]
    orders: int
    customers: int
    days: list[str] = field(default_factory=list)
    contended: set[str] = field(default_factory=set)


def _order_commands(rng: random.Random, order_id: str, customer_id: str, skus: list[str],
                    day: str) -> Iterator[Command]:
    yield Command("CreateOrder", {"order_id": order_id, "customer_id": customer_id})
    in_cart: list[str] = []
    for _ in range(rng.randint(3, 8)):
        sku = rng.choice(skus)
        yield Command("AddItem", {"order_id": order_id, "sku": sku, "qty": rng.randint(1, 3)})
        if sku not in in_cart:
            in_cart.append(sku)
        if in_cart and rng.random() < 0.22:
            gone = rng.choice(in_cart)
            in_cart.remove(gone)
            yield Command("RemoveItem", {"order_id": order_id, "sku": gone})
            if rng.random() < 0.35:  # changed their mind again
                in_cart.append(gone)
                yield Command("AddItem", {"order_id": order_id, "sku": gone, "qty": rng.randint(1, 2)})
    if in_cart and rng.random() < 0.85:
        yield Command("SubmitOrder", {"order_id": order_id, "day": day})


def plan_stream(events: int, seed: int = 7) -> StreamPlan:
    """Commands for about ``events`` events (hundreds of orders for thousands of events)."""
    rng = random.Random(seed)
    orders = max(4, round(events / EVENTS_PER_ORDER))
    customers = max(3, orders // 8)
    skus = [f"sku-{n:03d}" for n in range(1, 31)]
    prices = {sku: rng.randrange(199, 9999, 25) for sku in skus}
    days = ["2026-11-24", "2026-11-25", "2026-11-26"]
    plans: list[Iterator[Command]] = [
        _order_commands(rng, f"ord-{n:05d}", f"cust-{rng.randrange(customers):03d}", skus,
                        days[n * len(days) // orders])
        for n in range(orders)
    ]
    commands: list[Command] = []
    active: list[Iterator[Command]] = []
    waiting = iter(plans)
    submitted = 0
    contended: set[str] = set()
    while True:
        while len(active) < ACTIVE_ORDERS:
            nxt = next(waiting, None)
            if nxt is None:
                break
            active.append(nxt)
        if not active:
            break
        current = rng.choice(active)
        command = next(current, None)
        if command is None:
            active.remove(current)
            continue
        if command.name == "SubmitOrder":
            submitted += 1
            if submitted % CONTEND_EVERY == 1:
                contended.add(command.args["order_id"])
        commands.append(command)
        if rng.random() < 0.01:
            sku = rng.choice(skus)
            commands.append(Command("ChangePrice", {"sku": sku,
                                                    "price_cents": rng.randrange(199, 9999, 25)}))
    return StreamPlan(prices, commands, orders, customers, days, contended)
