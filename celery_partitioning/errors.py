"""Exceptions raised by celery-partitioning: one base class, two kinds."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PartitioningError", "PartitionKeyError", "PartitionConfigError", "PublishManyError"]


class PartitioningError(Exception):
    """Base class of every error this package raises on purpose."""


class PartitionKeyError(PartitioningError, ValueError):
    """A partition key could not be computed, or a call would bypass its partition.

    Raised at publish time: when it is raised, nothing was published.
    """


class PartitionConfigError(PartitioningError):
    """A setting, or the task registry, is not valid for partitioning."""


class PublishManyError(PartitioningError):
    """The broker failed part-way through ``publish_many``; says exactly where.

    Positions are indexes into the list given to ``publish_many``:

    * ``published``: confirmed by the broker (Redis answered the pipeline; RabbitMQ acked);
    * ``unconfirmed``: sent in the round trip that failed: each may or may not be on the
      broker (at most one chunk);
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
