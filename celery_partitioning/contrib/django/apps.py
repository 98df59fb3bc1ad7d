"""The Django AppConfig: a system check that validates the partitioned task registry.

With ``"celery_partitioning.contrib.django"`` in ``INSTALLED_APPS``, ``manage.py check``
(and so ``runserver`` and ``migrate``) reports every misconfigured partitioned task, one
error each, before anything is published. This is the only module that imports Django.
"""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks

__all__ = ["CeleryPartitioningConfig", "check_partitioned_tasks"]


def check_partitioned_tasks(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    """Django system check: the current Celery app's partitioning settings and registry."""
    from celery import current_app

    from ...errors import PartitioningError
    from ...state import STATE_ATTRIBUTE
    from ...validation import assert_valid_partition_keys

    app = current_app._get_current_object()
    if STATE_ATTRIBUTE not in vars(app):
        return [checks.Warning(
            "celery_partitioning is not installed on the current Celery app",
            hint="call celery_partitioning.install(app) in your project's celery.py",
            id="celery_partitioning.W001",
        )]
    # Celery's Django fixup runs the system checks when the task modules are imported
    # (import_modules → validate_models → run_checks): importing them from here re-enters
    # this check. The flag on the app stops that recursion; the outer call does the work.
    if vars(app).get("_celery_partitioning_checking"):
        return []
    app._celery_partitioning_checking = True
    try:
        app.loader.import_default_modules()
    finally:
        app._celery_partitioning_checking = False
    try:
        assert_valid_partition_keys(app)
    except PartitioningError as exc:
        lines = [line.strip()[2:] for line in str(exc).splitlines()[1:] if line.strip()]
        return [checks.Error(line or str(exc), id="celery_partitioning.E001") for line in lines or [str(exc)]]
    return []


class CeleryPartitioningConfig(AppConfig):
    """Registers the partitioning system check."""

    name = "celery_partitioning.contrib.django"
    label = "celery_partitioning"
    verbose_name = "Celery partitioning"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        checks.register(check_partitioned_tasks, "celery_partitioning")
