"""A stage of a partition's pipeline, the pipeline itself, and where a partition is.

A partition runs every message through an ordered list of stages (``pipeline.py`` builds
it), in the spirit of Dramatiq's ``Middleware``: each stage is one class in one module with
named hooks, and owns its own state; no stage reads another's fields. What stages tell each
other travels on the message (``PartitionMessage.attempts``, ``.call``) or in the outcome.

``before(msg) -> Verdict``
    Before the message runs, in list order: ``RUN`` lets it pass; ``TAKEN`` (the stage acked
    it after re-publishing it, setting it aside...) and ``BACK`` (it goes back to the head
    unacked: the partition stops) end its way, later stages are not asked. A stage that
    raises stops the process without acking (the message recovers at the head).
``retrying(msg, retry) -> bool``
    The task asked for a retry (``task_patch.py``); True when this stage took the message
    (set it aside: Celery records the retry and acks). None took it: it retries in place.
``failed(msg, failure)``
    The task failed for good (no retry left, or none asked), before Celery records it.
``after(msg, outcome)``
    The message is done: called by the executor just before its ack (never for a message
    that goes back to the head), so a crash in between leaves it to run again.
``between(idle)``
    Between two messages, when none of the partition's messages is in flight (``idle``: the
    last fetch found the queue empty); returns how soon it wants to be called again (seconds:
    the next fetch waits no longer), or None.
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
    """What a stage's ``before`` decides for a message."""

    RUN = "run"
    TAKEN = "taken"
    BACK = "back"


class Ended(enum.Enum):
    """How a message that ran ended (see :class:`Outcome`)."""

    SUCCEEDED = "succeeded"
    #: Failed for good (``Stage.failed`` was called).
    FAILED = "failed"
    #: A retry set its key aside (``Stage.retrying`` took it): not done, it runs again.
    SET_ASIDE = "set aside"
    #: Acked otherwise: revoked or expired before it ran, Celery's ``Ignore``/``Reject``/own
    #: ``Retry``, or a task that is not partitioned.
    ACKED = "acked"


@dataclass(frozen=True)
class Outcome:
    """What ``after`` hooks are told about a message about to be acked."""

    ended: Ended = Ended.ACKED
    #: ``SET_ASIDE``: when its key is due again (epoch s).
    resume_at: float = 0.0

    @property
    def done(self) -> bool:
        """The message will not run again (a set-aside one will)."""
        return self.ended is not Ended.SET_ASIDE


@dataclass(frozen=True)
class Failure:
    """A task that failed for good: Celery's task and request, and why."""

    task: Any
    request: Any
    exc: BaseException
    #: It asked for a retry with none left.
    exhausted: bool


class Stage:
    """One stage of a partition's pipeline (see the module docstring); every hook is optional."""

    #: How the start-up line, log lines and metrics name it.
    name: str = "stage"

    def before(self, msg: PartitionMessage) -> Verdict:
        return Verdict.RUN

    def retrying(self, msg: PartitionMessage, record: AttemptRecord, delay: float) -> bool:
        """``record``: the retry count and due time of the next attempt, in ``delay`` s."""
        return False

    def failed(self, msg: PartitionMessage, failure: Failure) -> bool:
        """True when this stage recorded the failure (a dead letter)."""
        return False

    def after(self, msg: PartitionMessage, outcome: Outcome) -> None:
        return None

    def between(self, idle: bool) -> float | None:
        return None

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


@dataclass(eq=False)
class Pipeline:
    """A partition's stages in order, and the message running through them now."""

    stages: list[Stage] = field(default_factory=list)
    #: Called with each stage that takes a message (metrics count them).
    on_taken: list[Callable[[Stage], None]] = field(default_factory=list)
    #: The message that passed every ``before`` and runs now (one at a time), and how it ended.
    running: PartitionMessage | None = None
    outcome: Outcome = Outcome()
    asking: Stage | None = None

    def describe(self) -> str:
        return ", ".join(stage.name for stage in self.stages)

    def before(self, msg: PartitionMessage) -> Verdict:
        """Every stage's ``before`` until one does not let ``msg`` pass (``asking``: the stage
        asked last, the one that failed when this raises)."""
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

    def current(self, task_id: str | None) -> PartitionMessage | None:
        """The running message if it is task ``task_id``'s."""
        msg = self.running
        return msg if msg is not None and task_id and msg.task_id == task_id else None

    def retrying(self, msg: PartitionMessage, record: AttemptRecord, delay: float) -> bool:
        for stage in list(self.stages):
            if stage.retrying(msg, record, delay):
                self.outcome = Outcome(Ended.SET_ASIDE, record.resume_at)
                return True
        return False

    def failed(self, msg: PartitionMessage, failure: Failure) -> bool:
        self.outcome = Outcome(Ended.FAILED)
        recorded = False
        for stage in list(self.stages):
            recorded = stage.failed(msg, failure) or recorded
        return recorded

    def succeeded(self, msg: PartitionMessage) -> None:
        self.outcome = Outcome(Ended.SUCCEEDED)

    def after(self, msg: PartitionMessage) -> None:
        """The executor is about to ack ``msg``: every stage's ``after``, with its outcome."""
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
