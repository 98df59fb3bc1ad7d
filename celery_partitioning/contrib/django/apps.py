"""The Django AppConfig: a system check that validates the partitioned task registry.

With ``"celery_partitioning.contrib.django"`` in ``INSTALLED_APPS``, ``manage.py check``
(and so ``runserver`` and ``migrate``) reports every misconfigured partitioned task, one
error each, before anything is published (the check itself: ``checks``).
"""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks
from django.db.models.signals import post_migrate

from .checks import check_partitioned_tasks
from .permissions import create_operate_permission

__all__ = ["CeleryPartitioningConfig", "check_partitioned_tasks"]


class CeleryPartitioningConfig(AppConfig):
    """Registers the partitioning system check, and the permission of the admin pages."""

    name = "celery_partitioning.contrib.django"
    label = "celery_partitioning"
    verbose_name = "Celery partitioning"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        checks.register(check_partitioned_tasks, "celery_partitioning")
        post_migrate.connect(create_operate_permission, sender=self)
