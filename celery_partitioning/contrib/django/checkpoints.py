"""The Django checkpoint store: a task body and its checkpoint row in one ``transaction.atomic``.

The default store of an app whose Django project lists ``"celery_partitioning.contrib.django"``
in ``INSTALLED_APPS`` (run ``manage.py migrate`` for its table). The database is the setting
``partitioning_checkpoint_database`` (Django: ``CELERY_PARTITIONING_CHECKPOINT_DATABASE``,
default ``"default"``): the projection's rows must live in the same database.

Two transactions for the same (projection, key) never both commit a claim: the first
statement is a conditional ``UPDATE ... WHERE position < new`` (or, for message ids, an
``UPDATE`` that locks the row), so the second waits for the first's row lock (PostgreSQL,
MySQL) or write lock (SQLite) and then sees its committed position; a first claim for a
key is an ``INSERT`` against the unique (projection, key) constraint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.db.models import Count, F, Max, Q, Sum
from django.utils import timezone

from ...checkpoint import Mark

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["DjangoCheckpointStore", "django_store_installed"]

#: The AppConfig module that owns the checkpoint table.
APP_MODULE = "celery_partitioning.contrib.django"


def django_store_installed() -> bool:
    """Whether Django is configured with ``celery_partitioning.contrib.django`` installed."""
    import os

    from django.apps import apps
    from django.conf import settings

    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return False
    if apps.ready:
        return bool(apps.is_installed(APP_MODULE))
    return APP_MODULE in getattr(settings, "INSTALLED_APPS", ())


class DjangoCheckpointStore:
    """Checkpoints in the ``celery_partitioning.Checkpoint`` table of one database."""

    def __init__(self, app: Celery | None = None, *, using: str | None = None) -> None:
        if using is None and app is not None:
            from ...state import settings_of

            using = settings_of(app).checkpoint_database
        self.using = using or "default"
        from django.db import connections

        if self.using not in connections.settings:
            from ...errors import PartitionConfigError

            raise PartitionConfigError(
                f"setting partitioning_checkpoint_database (Django: "
                f"CELERY_PARTITIONING_CHECKPOINT_DATABASE) is {self.using!r}, which is not in "
                f"DATABASES ({', '.join(connections.settings)}); use the projections' database"
            )

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """The transaction a body and its checkpoint share (override to wrap it, e.g. a lock)."""
        atomic: contextlib.AbstractContextManager[Any] = transaction.atomic(using=self.using)
        return atomic

    @contextlib.contextmanager
    def atomic(self, mark: Mark) -> Iterator[bool]:
        """Claim ``mark`` and yield whether it is new; commit together with the body."""
        with self.transaction():
            yield self.claim(mark)

    def claim(self, mark: Mark) -> bool:
        """Inside the transaction: record ``mark`` if it is new, else count a skip."""
        if mark.position is None:
            return self._claim_message_id(mark)
        return self._claim_position(mark, mark.position)

    def _rows(self) -> Any:
        from .models import Checkpoint

        return Checkpoint.objects.using(self.using)

    def _create(self, **fields: Any) -> bool:
        """Insert the first checkpoint of a key; False when another transaction has it."""
        try:
            with transaction.atomic(using=self.using):  # a savepoint: the outer one goes on
                self._rows().create(**fields)
        except IntegrityError:
            return False
        return True

    def _claim_position(self, mark: Mark, position: int) -> bool:
        rows = self._rows().filter(projection=mark.projection, key=mark.key)
        advanced = rows.filter(Q(position__lt=position) | Q(position__isnull=True)).update(
            position=position, applied=F("applied") + 1, updated_at=timezone.now())
        if advanced or self._create(projection=mark.projection, key=mark.key,
                                    position=position, applied=1):
            return True
        rows.update(skipped=F("skipped") + 1)
        return False

    def _claim_message_id(self, mark: Mark) -> bool:
        if not mark.message_id:
            return True  # a direct call without a message id: nothing to deduplicate by
        rows = self._rows().filter(projection=mark.projection, key=mark.key)
        # Lock the row first (or create it): the read below then sees the last commit.
        if not rows.update(updated_at=timezone.now()):
            if self._create(projection=mark.projection, key=mark.key,
                            recent_ids=[mark.message_id], applied=1):
                return True
            rows.update(updated_at=timezone.now())
        recent = list(rows.values_list("recent_ids", flat=True).get() or [])
        if mark.message_id in recent:
            rows.update(skipped=F("skipped") + 1)
            return False
        recent = [*recent, mark.message_id][-mark.window:]
        rows.update(recent_ids=recent, applied=F("applied") + 1)
        return True

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per projection: keys, messages applied and skipped, last update (for ``status``)."""
        found = self._rows().values("projection").annotate(
            keys=Count("id"), applied_total=Sum("applied"), skipped_total=Sum("skipped"),
            last=Max("updated_at"))
        return {
            row["projection"]: {
                "keys": int(row["keys"]),
                "applied": int(row["applied_total"] or 0),
                "skipped": int(row["skipped_total"] or 0),
                "last_update": row["last"].isoformat() if row["last"] else None,
            }
            for row in found.order_by("projection")
        }
