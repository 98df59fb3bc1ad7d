"""Read-only admins: checkpoints (what each projection has applied, per key) and the outbox."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from .models import Checkpoint, OutboxMessage

__all__ = ["CheckpointAdmin", "OutboxMessageAdmin"]


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Checkpoint)
class CheckpointAdmin(_ReadOnlyAdmin):
    """Checkpoints are written by the workers only; editing one would skip or repeat events."""

    list_display = ("projection", "key", "position", "applied", "skipped", "updated_at")
    list_filter = ("projection",)
    search_fields = ("key",)
    ordering = ("projection", "key")


@admin.register(OutboxMessage)
class OutboxMessageAdmin(_ReadOnlyAdmin):
    """Outbox rows are written by ``outbox.publish`` and deleted by the relay: read only, so
    an edit cannot publish a message its transaction never made, or drop one it did."""

    list_display = ("id", "task_name", "partition_key", "routing_key", "task_id", "created_at")
    list_filter = ("task_name",)
    search_fields = ("partition_key", "task_id")
    ordering = ("id",)
    exclude = ("body",)
