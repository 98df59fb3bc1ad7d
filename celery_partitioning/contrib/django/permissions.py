"""The permission to act on partitions from the admin pages: ``celery_partitioning.operate_partitions``.

Created after ``migrate`` (post_migrate), on the content type of the checkpoint model, so it
needs no migration of its own. Staff without it see the pages read-only; the actions answer
403 to them.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["CODENAME", "PERMISSION", "can_operate", "create_operate_permission"]

CODENAME: Final = "operate_partitions"
#: The ``user.has_perm`` name.
PERMISSION: Final = f"celery_partitioning.{CODENAME}"


def create_operate_permission(using: str = "default", **_: Any) -> None:
    """post_migrate receiver: make sure the permission exists (idempotent)."""
    from django.apps import apps

    if not (apps.is_installed("django.contrib.auth")
            and apps.is_installed("django.contrib.contenttypes")):
        return
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType

    from .models import Checkpoint

    content_type = ContentType.objects.db_manager(using).get_for_model(Checkpoint)
    Permission.objects.db_manager(using).get_or_create(
        codename=CODENAME, content_type=content_type,
        defaults={"name": "Can replay, skip and discard dead letters of partitions"})


def can_operate(user: Any) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perm(PERMISSION))
