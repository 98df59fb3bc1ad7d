"""The shop's Celery tasks: one per projection (each with its partition strategy) and the
inventory reservation command (DCB scope, retried on conflicts).

| projection            | strategy | key                         | pool     |
| --------------------- | -------- | --------------------------- | -------- |
| orderSummary          | entity   | ``Order:<order_id>``        | entity   |
| productCatalog        | entity   | ``Product:<sku>``           | entity   |
| customerOrderHistory  | customer | ``<customer_id>``           | customer |
| orderWithInventory    | saga     | ``<correlation_id>``        | saga     |
| dailySalesSummary     | global   | ``global``                  | global   |
| reserve_inventory     | dcb      | ``dcb:tenant:T:reservation:<id>`` | dcb |

Every projection task names its checkpoint: the event's ``position`` in the event store,
which increases per partition key because events are published in position order. With
``celery_partitioning.contrib.django`` the task body and the ``(projection, key)``
checkpoint commit in one transaction; a message delivered again after its commit (a worker
killed before the ack) is skipped. ``SHOP_CHECKPOINTS=0`` declares the same tasks without
a checkpoint, to show what at-least-once delivery does to read-modify-write projections.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery import shared_task
from celery.app.task import Task
from django.apps import apps
from django.conf import settings

from celery_partitioning import (
    GLOBAL_PARTITION_KEY,
    create_customer_partition_key,
    create_entity_partition_key,
    create_saga_partition_key,
    projection,
)

from .chaos import maybe_stall_mid_task
from .dblock import write_transaction
from .inventory import reserve_inventory
from .projections import by_name

__all__ = [
    "apply_to_row",
    "order_summary",
    "product_catalog",
    "customer_order_history",
    "order_with_inventory",
    "daily_sales_summary",
    "reserve_inventory",
    "PROJECTION_TASKS",
    "event_position",
]


def event_position(args: Mapping[str, Any]) -> int:
    """The checkpoint of every projection task: the event's position in the event store."""
    position: int = args["event"]["position"]
    return position


#: ``checkpoint=`` of the projection tasks (None: declared without, ``SHOP_CHECKPOINTS=0``).
CHECKPOINT = event_position if settings.SHOP_CHECKPOINTS else None


def apply_to_row(name: str, event: Mapping[str, Any]) -> None:
    """Apply one event to the projection's row: read it, compute, write it back.

    Deliberately plain (no lock, no transaction of its own around read and write), as most
    read-model handlers are: correctness comes from running one event of a key at a time, in
    order, and once: the checkpoint's transaction wraps all of it.
    """
    proj = by_name(name)
    model = apps.get_model("shop", proj.model)
    pk_name = model._meta.pk.name
    row_key = proj.row_key(event)
    row = model.objects.filter(pk=row_key).values().first()
    state = None if row is None else {k: v for k, v in row.items() if k != pk_name}
    new = proj.apply(state, event)
    if proj.slow_write:
        time.sleep(settings.SHOP_GLOBAL_WRITE_DELAY_MS / 1000)
        maybe_stall_mid_task()
    with write_transaction():
        model.objects.update_or_create(pk=row_key, defaults=new)


@shared_task(name="shop.order_summary")
@projection("orderSummary", key=create_entity_partition_key("Order"), pool="entity",
            checkpoint=CHECKPOINT)
def order_summary(order_id: str, event: dict[str, Any]) -> None:
    apply_to_row("orderSummary", event)


@shared_task(name="shop.product_catalog")
@projection("productCatalog", key=create_entity_partition_key("Product", field="sku"), pool="entity",
            checkpoint=CHECKPOINT)
def product_catalog(sku: str, event: dict[str, Any]) -> None:
    apply_to_row("productCatalog", event)


@shared_task(name="shop.customer_order_history")
@projection("customerOrderHistory", key=create_customer_partition_key(), pool="customer",
            checkpoint=CHECKPOINT)
def customer_order_history(customer_id: str, event: dict[str, Any]) -> None:
    apply_to_row("customerOrderHistory", event)


@shared_task(name="shop.order_with_inventory")
@projection("orderWithInventory", key=create_saga_partition_key(), pool="saga",
            checkpoint=CHECKPOINT)
def order_with_inventory(correlation_id: str, event: dict[str, Any]) -> None:
    apply_to_row("orderWithInventory", event)


@shared_task(name="shop.daily_sales_summary")
@projection("dailySalesSummary", key=lambda args: GLOBAL_PARTITION_KEY, pool="global",
            checkpoint=CHECKPOINT)
def daily_sales_summary(event: dict[str, Any]) -> None:
    apply_to_row("dailySalesSummary", event)


#: Projection name → (its task, the event field passed as the key argument).
PROJECTION_TASKS: dict[str, tuple[Task, str | None]] = {
    "orderSummary": (order_summary, "order_id"),
    "productCatalog": (product_catalog, "sku"),
    "customerOrderHistory": (customer_order_history, "customer_id"),
    "orderWithInventory": (order_with_inventory, "correlation_id"),
    "dailySalesSummary": (daily_sales_summary, None),
}
