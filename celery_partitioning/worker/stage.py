"""A stage of a partition's pipeline, and where a partition is (what a stage may know of it).

A partition runs every message through an ordered list of stages (``pipeline.py`` builds
it), in the spirit of Dramatiq's ``Middleware``: each stage is one class in one module with
named hooks, and owns its own state; no stage reads another's fields.

``before(msg)``
    Before the message runs: True when the stage *took* it (acked it after re-publishing it,
    setting it aside, holding it): it does not run and later stages are not asked. A stage
    that raises stops the process without acking (the message recovers at the head).
``between(idle)``
    Between two messages, when none of the partition's messages is in flight (``idle``: the
    last fetch found the queue empty); returns how soon it wants to be called again (seconds:
    the next fetch waits no longer), or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..message import PartitionMessage

if TYPE_CHECKING:
    from celery import Celery

    from ..config import PartitioningSettings

__all__ = ["Place", "Stage"]


class Stage:
    """One stage of a partition's pipeline (see the module docstring); every hook is optional."""

    #: How the start-up line, log lines and metrics name it.
    name: str = "stage"

    def before(self, msg: PartitionMessage) -> bool:
        """Before ``msg`` runs: True when this stage took it (it must not run)."""
        return False

    def between(self, idle: bool) -> float | None:
        """Between two messages: seconds until it wants to be called again, or None."""
        return None

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


@dataclass(frozen=True)
class Place:
    """Where a partition is: what a stage that writes records about it needs to know."""

    app: Celery
    settings: PartitioningSettings
    pool: str
    index: int
    #: The partition queue name.
    queue: str
    #: The Celery node name of the worker process ("" unknown).
    hostname: str = ""

    @property
    def label(self) -> str:
        """``pool.index``: how log lines name this partition."""
        return f"{self.pool}.{self.index}"
