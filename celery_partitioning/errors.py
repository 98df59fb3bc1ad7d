"""Every exception celery-partitioning raises on purpose: one base class, one module.

``PartitionKeyError`` is a bad call (raised at publish: nothing was published),
``PartitionConfigError`` a bad setting or task registry, ``DeadLetterError`` a dead-letter
command that cannot be carried out, and ``DCBConflict`` the exception a DCB command raises
to have its operation retried in place on its scope's partition (``dcb.with_dcb_retry``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PartitioningError", "PartitionKeyError", "PartitionConfigError", "DeadLetterError",
           "DCBConflict"]


class PartitioningError(Exception):
    """Base class of every error this package raises on purpose."""


class PartitionKeyError(PartitioningError, ValueError):
    """A partition key could not be computed, or a call would bypass its partition.

    Raised at publish time: when it is raised, nothing was published.
    """


class PartitionConfigError(PartitioningError):
    """A setting, or the task registry, is not valid for partitioning."""


class DeadLetterError(PartitioningError):
    """A dead-letter command could not be carried out (unknown key, replayed already...)."""


class DCBConflict(PartitioningError):
    """An optimistic-concurrency conflict on a DCB scope: the scope moved since it was read.

    Raise it from a ``with_dcb_retry`` task to have the operation retried in place on the
    scope's ``dcb`` partition.
    """

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
