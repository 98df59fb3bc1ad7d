"""A read-only admin for checkpoints: what each projection has applied, per key."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from .models import Checkpoint

__all__ = ["CheckpointAdmin"]


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    """Checkpoints are written by the workers only; editing one would skip or repeat events."""

    list_display = ("projection", "key", "position", "applied", "skipped", "updated_at")
    list_filter = ("projection",)
    search_fields = ("key",)
    ordering = ("projection", "key")

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False
