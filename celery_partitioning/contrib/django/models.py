"""The checkpoint table: ``(projection, partition key) -> last applied position``."""

from __future__ import annotations

from django.db import models

__all__ = ["Checkpoint"]


class Checkpoint(models.Model):
    """How far one projection has applied the events of one partition key.

    Written in the same transaction as the projection's own rows (see
    ``celery_partitioning.contrib.django.checkpoints``). ``position`` is the last applied
    event position (None for projections that deduplicate by message id, which keep the
    last message ids in ``recent_ids`` instead).
    """

    projection = models.CharField(max_length=200)
    key = models.CharField(max_length=500)
    position = models.BigIntegerField(null=True, blank=True)
    recent_ids = models.JSONField(default=list, blank=True)
    applied = models.BigIntegerField(default=0)
    skipped = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "celery_partitioning"
        ordering = ("projection", "key")
        constraints = (
            models.UniqueConstraint(fields=("projection", "key"), name="one_checkpoint_per_key"),
        )

    def __str__(self) -> str:
        where = "" if self.position is None else f" @ {self.position}"
        return f"{self.projection}[{self.key}]{where}"
