"""A stage of a partition's pipeline, the pipeline itself, and where a partition is.

A partition runs every message through an ordered list of stages (``pipeline.py`` builds
it), in the spirit of Dramatiq's ``Middleware``: each stage is one class in one module with
named hooks (:class:`Stage`), called in list order, and owns its own state; no stage reads
another's fields. What one tells a later one travels on the message
(``PartitionMessage.attempts``, ``.call``) or in the :class:`Outcome`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..message import PartitionMessage
from ..store.attempts import AttemptRecord

if TYPE_CHECKING:
    from celery import Celery

    from ..config import PartitioningSettings

__all__ = ["Ended", "Failure", "Outcome", "Pipeline", "Place", "Stage", "Verdict"]


class Verdict(enum.Enum):
    """What a stage's ``before`` decides: let the message pass, or end its way there (taken:
    acked after the stage re-published it, set it aside...; back: to the head, unacked)."""

    RUN = "run"
    TAKEN = "taken"
    BACK = "back"


class Ended(enum.Enum):
    """How a message that ran ended (see :class:`Outcome`)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # for good: the ``failed`` hooks ran
    SET_ASIDE = "set aside"  # a ``retrying`` hook took it: it runs again when its key is due
    ACKED = "acked"  # otherwise: revoked or expired unrun, Ignore, Reject, a plain Retry...


@dataclass(frozen=True)
class Outcome:
    """How a message about to be acked ended (``SET_ASIDE``: with its key's due time)."""

    ended: Ended = Ended.ACKED
    resume_at: float = 0.0

    @property
    def done(self) -> bool:
        """It will not run again (one set aside will)."""
        return self.ended is not Ended.SET_ASIDE


@dataclass(frozen=True)
class Failure:
    """A task that failed for good (``exhausted``: it asked for a retry with none left)."""

    task: Any
    request: Any
    exc: BaseException
    exhausted: bool


class Stage:
    """One stage of a partition's pipeline; every hook is optional."""

    #: How the start-up line, log lines and metrics name it.
    name: str = "stage"

    def before(self, msg: PartitionMessage) -> Verdict:
        """Before the message runs; the first verdict other than RUN ends its way (later
        stages are not asked). Raising stops the process without acking."""
        return Verdict.RUN

    def retrying(self, msg: PartitionMessage, record: AttemptRecord, delay: float) -> bool:
        """The task asked for a retry in ``delay`` s (``record``: its count and due time);
        True when this stage took the message (set it aside: Celery records the retry and
        acks). None took it: the retry waits in place (``task_patch.py``)."""
        return False

    def failed(self, msg: PartitionMessage, failure: Failure) -> bool:
        """The task failed for good, before Celery records it; True when recorded."""
        return False

    def after(self, msg: PartitionMessage, outcome: Outcome) -> None:
        """The message is about to be acked (the executor calls it just before the ack, so a
        crash in between runs it again); never for one that goes back to the head."""
        return None

    def between(self, idle: bool) -> float | None:
        """Between two messages, none in flight (``idle``: the last fetch found none):
        seconds until it wants to be called again (the next fetch waits no longer), or None."""
        return None

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


@dataclass(eq=False)
class Pipeline:
    """A partition's stages in order, and the message running through them now."""

    stages: list[Stage] = field(default_factory=list)
    #: Called with each stage that takes a message (metrics count them).
    on_taken: list[Callable[[Stage], None]] = field(default_factory=list)
    #: The message that passed every ``before`` (one at a time), and how it ended so far.
    running: PartitionMessage | None = None
    outcome: Outcome = Outcome()
    #: The stage asked last by :meth:`before` (the one that failed, when it raises).
    asking: Stage | None = None

    def describe(self) -> str:
        return ", ".join(stage.name for stage in self.stages)

    def before(self, msg: PartitionMessage) -> Verdict:
        self.running = None
        for stage in list(self.stages):
            self.asking = stage
            verdict = stage.before(msg)
            if verdict is Verdict.TAKEN:
                for taken in self.on_taken:
                    taken(stage)
            if verdict is not Verdict.RUN:
                return verdict
        self.running, self.outcome = msg, Outcome()
        return Verdict.RUN

    def current(self, task_id: str) -> PartitionMessage | None:
        """The running message if it is task ``task_id``'s."""
        msg = self.running
        return msg if msg is not None and msg.task_id == task_id else None

    def retrying(self, msg: PartitionMessage, record: AttemptRecord, delay: float) -> bool:
        taken = any(stage.retrying(msg, record, delay) for stage in list(self.stages))
        if taken:
            self.outcome = Outcome(Ended.SET_ASIDE, record.resume_at)
        return taken

    def failed(self, msg: PartitionMessage, failure: Failure) -> bool:
        self.outcome = Outcome(Ended.FAILED)
        return any([stage.failed(msg, failure) for stage in list(self.stages)])

    def succeeded(self, msg: PartitionMessage) -> None:
        self.outcome = Outcome(Ended.SUCCEEDED)

    def after(self, msg: PartitionMessage) -> None:
        outcome, self.running = self.outcome, None
        for stage in list(self.stages):
            stage.after(msg, outcome)


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
