"""What the ``celery worker`` banner of a partition worker process says.

Celery prints ``concurrency: 1 (solo)`` and the idle queue its own consumer listens to, which
misleads: the tasks run in the partition threads. At ``celeryd_after_setup`` the concurrency
line names those threads, the idle queue is explained, and a ``[partitions]`` section lists
the queues they consume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import compat

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

__all__ = ["describe_partitions", "rewrite_banner"]

#: What the idle queue is, on its banner line.
IDLE_NOTE = "(control only: nothing is sent here; the partitions below run the tasks)"


def rewrite_banner(text: str, runtime: WorkerRuntime, idle_queue: str) -> str:
    """Celery's startup banner with the concurrency line and the idle queue explained."""
    pools = ", ".join(dict.fromkeys(p.pool for p in runtime.partitions))
    threads = len(runtime.partitions)
    lines = []
    for line in text.split("\n"):
        head, marker, _rest = line.partition(".> concurrency:")
        if marker:
            lines.append(f"{head}.> concurrency: {threads} partition thread(s) (pool(s) "
                         f"{pools}), one message at a time each")
            continue
        head, marker, _rest = line.partition(f".> {idle_queue} ")
        lines.append(f"{head}.> {idle_queue} {IDLE_NOTE}" if marker else line)
    return "\n".join(lines)


def describe_partitions(runtime: WorkerRuntime) -> str:
    """The ``[partitions]`` section printed after Celery's own banner sections."""
    rows = [f".> {p.queue}  (thread {p.label})" for p in runtime.partitions]
    return "\n[partitions]\n" + "\n".join(rows) + "\n"


def install_banner(worker: object, runtime: WorkerRuntime, idle_queue: str,
                   extra: str = "") -> None:
    """Make ``worker`` print this banner, then ``extra`` (the outbox relay's section)."""
    compat.rewrite_worker_banner(worker, lambda text: rewrite_banner(text, runtime, idle_queue),
                                 describe_partitions(runtime) + extra)
