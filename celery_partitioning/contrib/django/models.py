"""The checkpoint table (``(projection, partition key) -> last applied position``) and the outbox."""

from __future__ import annotations

from django.db import models

__all__ = ["Checkpoint", "OutboxMessage"]


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


class OutboxMessage(models.Model):
    """A task message ready for the broker, stored by ``outbox.publish`` in the caller's
    transaction and deleted by the relay once the broker confirmed it (``outbox.py``).

    The row holds exactly what ``apply_async`` would have handed to kombu's ``publish``:
    exchange, routing key, headers, properties and the serialized body, so the relay
    publishes it unchanged (same task id). Rows are relayed in ``id`` order.
    """

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(auto_now_add=True)
    task_name = models.CharField(max_length=255)
    task_id = models.CharField(max_length=255)
    #: The partition key (blank for a task that is not partitioned): shown in the admin.
    partition_key = models.CharField(max_length=500, blank=True, default="")
    exchange = models.CharField(max_length=255, blank=True, default="")
    routing_key = models.CharField(max_length=255, blank=True, default="")
    #: The queue kombu declares before publishing, as ``Queue.as_dict(recurse=True)`` (with
    #: its arguments: a partition queue's single active consumer); null: none.
    declare = models.JSONField(null=True, blank=True)
    headers = models.JSONField(default=dict)
    properties = models.JSONField(default=dict)
    body = models.BinaryField()
    content_type = models.CharField(max_length=100)
    content_encoding = models.CharField(max_length=50)
    compression = models.CharField(max_length=50, blank=True, default="")
    delivery_mode = models.PositiveSmallIntegerField(null=True, blank=True)

    class Meta:
        app_label = "celery_partitioning"
        ordering = ("id",)
        verbose_name = "outbox message"

    def __str__(self) -> str:
        key = f" [{self.partition_key}]" if self.partition_key else ""
        return f"#{self.id} {self.task_name}{key} {self.task_id}"
