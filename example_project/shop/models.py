"""The event store and the read models (projections) the workers write."""

from __future__ import annotations

from django.db import models


class StoredEvent(models.Model):
    """One event, in the order it happened (``position``).

    Events of a DCB scope also carry ``scope`` and ``scope_version``; the unique pair is the
    optimistic concurrency check: two writers appending at the same version conflict.
    """

    position = models.BigAutoField(primary_key=True)
    type = models.CharField(max_length=40)
    stream = models.CharField(max_length=120, db_index=True)
    scope = models.CharField(max_length=200, null=True, blank=True)
    scope_version = models.PositiveIntegerField(null=True, blank=True)
    data = models.JSONField()
    recorded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("position",)
        constraints = (
            models.UniqueConstraint(fields=("scope", "scope_version"), name="one_event_per_scope_version"),
        )

    def __str__(self) -> str:
        return f"#{self.position} {self.type} {self.stream}"


class OrderSummary(models.Model):
    """``orderSummary`` (entity key ``Order:<id>``): one row per order with its lines."""

    order_id = models.CharField(max_length=40, primary_key=True)
    customer_id = models.CharField(max_length=40, blank=True)
    status = models.CharField(max_length=20)
    lines = models.JSONField(default=dict)
    item_count = models.IntegerField(default=0)
    total_cents = models.BigIntegerField(default=0)

    class Meta:
        verbose_name_plural = "order summaries"

    def __str__(self) -> str:
        return self.order_id


class ProductCatalog(models.Model):
    """``productCatalog`` (entity key ``Product:<sku>``): last price and units in orders."""

    sku = models.CharField(max_length=40, primary_key=True)
    last_price_cents = models.BigIntegerField(default=0)
    units_in_orders = models.IntegerField(default=0)
    times_added = models.IntegerField(default=0)

    class Meta:
        verbose_name = "product catalog entry"
        verbose_name_plural = "product catalog"

    def __str__(self) -> str:
        return self.sku


class CustomerOrderHistory(models.Model):
    """``customerOrderHistory`` (customer key): a customer's orders in the order placed."""

    customer_id = models.CharField(max_length=40, primary_key=True)
    order_ids = models.JSONField(default=list)
    last_order_id = models.CharField(max_length=40, blank=True)
    orders_submitted = models.IntegerField(default=0)
    lifetime_value_cents = models.BigIntegerField(default=0)

    class Meta:
        verbose_name_plural = "customer order histories"

    def __str__(self) -> str:
        return self.customer_id


class OrderWithInventory(models.Model):
    """``orderWithInventory`` (saga key ``corr-<id>``): joins Orders and Inventory events."""

    correlation_id = models.CharField(max_length=40, primary_key=True)
    order_id = models.CharField(max_length=40, blank=True)
    status = models.CharField(max_length=30)
    total_cents = models.BigIntegerField(default=0)
    reservation_id = models.CharField(max_length=40, blank=True)
    reserved_units = models.IntegerField(default=0)

    class Meta:
        verbose_name_plural = "orders with inventory"

    def __str__(self) -> str:
        return self.correlation_id


class DailySalesSummary(models.Model):
    """``dailySalesSummary`` (global key): one read-modify-write total per day."""

    day = models.CharField(max_length=10, primary_key=True)
    orders = models.IntegerField(default=0)
    revenue_cents = models.BigIntegerField(default=0)
    items_sold = models.IntegerField(default=0)

    class Meta:
        verbose_name_plural = "daily sales summaries"

    def __str__(self) -> str:
        return self.day


class InventoryReservation(models.Model):
    """A reservation decided by the DCB command handler (scope ``tenant:T:reservation:<id>``)."""

    reservation_id = models.CharField(max_length=40, primary_key=True)
    order_id = models.CharField(max_length=40)
    status = models.CharField(max_length=20)
    lines = models.JSONField(default=dict)
    units = models.IntegerField(default=0)

    def __str__(self) -> str:
        return self.reservation_id
