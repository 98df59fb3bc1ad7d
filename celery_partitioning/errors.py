"""Exceptions raised by celery-partitioning: one base class, two kinds."""

from __future__ import annotations

__all__ = ["PartitioningError", "PartitionKeyError", "PartitionConfigError"]


class PartitioningError(Exception):
    """Base class of every error this package raises on purpose."""


class PartitionKeyError(PartitioningError, ValueError):
    """A partition key could not be computed, or a call would bypass its partition.

    Raised at publish time: when it is raised, nothing was published.
    """


class PartitionConfigError(PartitioningError):
    """A setting, or the task registry, is not valid for partitioning."""
