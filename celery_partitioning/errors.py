"""Every exception celery-partitioning raises on purpose: one base class, one module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PartitioningError", "PartitionKeyError", "PartitionConfigError", "DeadLetterError",
           "PauseError", "DCBConflict", "PublishManyError"]


class PartitioningError(Exception):
    """Base class of every error this package raises on purpose."""


class PartitionKeyError(PartitioningError, ValueError):
    """A partition key could not be computed, or a call would bypass its partition; raised at
    publish, so nothing was published."""


class PartitionConfigError(PartitioningError):
    """A setting, or the task registry, is not valid for partitioning."""


class DeadLetterError(PartitioningError):
    """A dead-letter command could not be carried out (unknown key, replayed already...)."""


class PauseError(PartitioningError):
    """A pause or resume could not be carried out (unknown partition, not paused...)."""


class DCBConflict(PartitioningError):
    """The DCB scope moved since it was read; from a ``with_dcb_retry`` task, the operation is
    retried in place on the scope's partition."""

    def __init__(self, scope_key: str, expected_version: Any = None,
                 actual_version: Any = None) -> None:
        super().__init__(scope_key, expected_version, actual_version)
        self.scope_key = scope_key
        self.expected_version = expected_version
        self.actual_version = actual_version

    def __str__(self) -> str:
        versions = ""
        if self.expected_version is not None or self.actual_version is not None:
            versions = f" (expected version {self.expected_version!r}, found {self.actual_version!r})"
        return f"DCB conflict on scope {self.scope_key!r}{versions}"


class PublishManyError(PartitioningError):
    """The broker failed part-way through ``publish_many``; says exactly where.

    Positions are indexes into the list given to ``publish_many``:

    * ``published``: confirmed by the broker (Redis answered the pipeline; RabbitMQ acked);
    * ``unconfirmed``: sent in the round trip that failed: each may or may not be on the
      broker (one chunk at most on Redis, two on RabbitMQ);
    * ``not_sent``: never left this process.

    ``task_ids[i]`` is the task id of position ``i``. Re-publishing ``unconfirmed`` and
    ``not_sent`` (in order, with the same task ids) leaves no gap; the messages of
    ``unconfirmed`` that did arrive then run twice, which idempotent or checkpointed tasks
    absorb. Nothing after ``published`` is reported as sent unless the broker said so.
    """

    def __init__(self, message: str, *, published: Sequence[int], unconfirmed: Sequence[int],
                 not_sent: Sequence[int], task_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.published = tuple(published)
        self.unconfirmed = tuple(unconfirmed)
        self.not_sent = tuple(not_sent)
        self.task_ids = tuple(task_ids)
