"""The Django admin lists the event store and every projection, read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import (
    CustomerOrderHistory,
    DailySalesSummary,
    InventoryReservation,
    OrderSummary,
    OrderWithInventory,
    ProductCatalog,
    StoredEvent,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Projections are written by the workers only: look, do not touch."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(StoredEvent)
class StoredEventAdmin(ReadOnlyAdmin):
    list_display = ("position", "type", "stream", "scope", "scope_version", "recorded_at")
    list_filter = ("type",)
    search_fields = ("stream", "scope")


@admin.register(OrderSummary)
class OrderSummaryAdmin(ReadOnlyAdmin):
    list_display = ("order_id", "customer_id", "status", "item_count", "total_cents", "lines")
    list_filter = ("status",)
    search_fields = ("order_id", "customer_id")


@admin.register(ProductCatalog)
class ProductCatalogAdmin(ReadOnlyAdmin):
    list_display = ("sku", "last_price_cents", "units_in_orders", "times_added")


@admin.register(CustomerOrderHistory)
class CustomerOrderHistoryAdmin(ReadOnlyAdmin):
    list_display = ("customer_id", "last_order_id", "orders_submitted", "lifetime_value_cents", "order_ids")
    search_fields = ("customer_id",)


@admin.register(OrderWithInventory)
class OrderWithInventoryAdmin(ReadOnlyAdmin):
    list_display = ("correlation_id", "order_id", "status", "total_cents", "reservation_id", "reserved_units")
    list_filter = ("status",)


@admin.register(DailySalesSummary)
class DailySalesSummaryAdmin(ReadOnlyAdmin):
    list_display = ("day", "orders", "revenue_cents", "items_sold")


@admin.register(InventoryReservation)
class InventoryReservationAdmin(ReadOnlyAdmin):
    list_display = ("reservation_id", "order_id", "status", "units", "lines")
