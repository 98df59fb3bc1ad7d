"""The shop's AppConfig: connects the progress counters to Celery's signals."""

from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"
    verbose_name = "Shop (events and projections)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import progress

        progress.connect_signals()
