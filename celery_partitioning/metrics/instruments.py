"""What a partition worker process counts, for ``partitioning worker --metrics-port``.

Imported only in a partition worker process whose worker runs with metrics (``METRICS_ENV``),
after ``PROMETHEUS_MULTIPROC_DIR`` is set, so every value goes to the multiprocess files the
metrics server reads: counters of a process that died keep counting in the sums.

Where each number comes from:

- processed / failed / retried, task duration: Celery's own task signals, sent in the partition
  thread that runs the task (per attempt for in-place retries); the partition is the thread's.
- skipped: the pipeline's ``on_taken`` hook, labelled with the stage that took the message.
- lease hand-overs and fences: the lease's ``on_acquire`` and ``on_fence`` hooks.
- hot keys and per-partition recent counts: :class:`.hotkeys.HotKeys`, flushed between messages.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from celery import signals
from prometheus_client import Counter, Histogram

from ..router import HEADER_KEY
from ..worker.runtime import PartitionRuntime, WorkerRuntime, current_runtime
from ..worker.stage import Stage
from . import HALF_LIFE_ENV, METRICS_ENV, MULTIPROC_ENV, key_label
from .hotkeys import HALF_LIFE, HotKeys

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["instrument"]

_LABELS: Final = ("pool", "partition")

PROCESSED = Counter("celery_partitioning_processed", "Messages whose task finished (succeeded "
                    "or failed for good)", _LABELS)
FAILED = Counter("celery_partitioning_failed", "Messages whose task failed for good "
                 "(dead-lettered, key parked)", _LABELS)
RETRIED = Counter("celery_partitioning_retried", "Task attempts that asked for a retry", _LABELS)
SKIPPED = Counter("celery_partitioning_skipped", "Messages a gate took instead of running them "
                  "(parked key, key in backoff, resize hold, misroute)", (*_LABELS, "gate"))
DURATION = Histogram("celery_partitioning_task_duration_seconds", "Duration of one task attempt",
                     _LABELS, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                       30, 60, 300))
HANDOVERS = Counter("celery_partitioning_lease_handovers", "Times a process of this worker took "
                    "a partition's lease (a start, a restart, a standby taking over)", _LABELS)
FENCES = Counter("celery_partitioning_lease_fences", "Times a process fenced itself: it lost, or "
                 "could not renew, a partition's lease", _LABELS)

_started: dict[str, float] = {}


@dataclass
class _Series:
    """One partition's counters, looked up once (``labels()`` takes a lock each call)."""

    processed: Any
    failed: Any
    retried: Any
    duration: Any


def instrument(app: Celery, worker: WorkerRuntime) -> None:
    """Count what ``worker``'s partitions do (once per process)."""
    directory = os.environ.get(MULTIPROC_ENV)
    hot = HotKeys(Path(directory) if directory else None,
                  half_life=float(os.environ.get(HALF_LIFE_ENV) or HALF_LIFE))
    raw = os.environ.get(METRICS_ENV) == "raw"
    series = {id(partition): _instrument_partition(partition, hot) for partition in worker.partitions}

    def here() -> tuple[PartitionRuntime, _Series] | None:
        runtime = current_runtime(app)
        found = series.get(id(runtime)) if runtime is not None else None
        return None if runtime is None or found is None else (runtime, found)

    def finished(sender: Any, failed: bool) -> None:
        found = here()
        if found is None:
            return
        runtime, counters = found
        counters.processed.inc()
        if failed:
            counters.failed.inc()
        key = getattr(getattr(sender, "request", None), HEADER_KEY, None)
        hot.count(runtime.pool, runtime.index, key_label(key, raw) if isinstance(key, str) else None)

    def on_success(sender: Any = None, **_: Any) -> None:
        finished(sender, failed=False)

    def on_failure(sender: Any = None, **_: Any) -> None:
        finished(sender, failed=True)

    def on_retry(sender: Any = None, **_: Any) -> None:
        found = here()
        if found is not None:
            found[1].retried.inc()

    def on_prerun(task_id: str = "", **_: Any) -> None:
        _started[task_id] = time.monotonic()

    def on_postrun(task_id: str = "", **_: Any) -> None:
        started = _started.pop(task_id, None)
        found = here()
        if started is not None and found is not None:
            found[1].duration.observe(time.monotonic() - started)

    for signal, receiver in ((signals.task_success, on_success), (signals.task_failure, on_failure),
                             (signals.task_retry, on_retry), (signals.task_prerun, on_prerun),
                             (signals.task_postrun, on_postrun)):
        signal.connect(receiver, weak=False)


def _instrument_partition(partition: PartitionRuntime, hot: HotKeys) -> _Series:
    labels = partition.pool, str(partition.index)
    for counter in (HANDOVERS, FENCES):
        counter.labels(*labels)  # a series at 0 from the start, so increase() and alerts see it
    pipeline = partition.pipeline
    for stage in pipeline.stages:
        SKIPPED.labels(*labels, stage.name)  # a series at 0 from the start
    pipeline.on_taken.append(lambda stage: SKIPPED.labels(*labels, stage.name).inc())
    pipeline.stages.append(_FlushHotKeys(hot))
    lease = partition.lease
    if lease is not None:
        lease.on_acquire.append(lambda: HANDOVERS.labels(*labels).inc())
        lease.on_fence.append(lambda _reason: FENCES.labels(*labels).inc())
    return _Series(PROCESSED.labels(*labels), FAILED.labels(*labels), RETRIED.labels(*labels),
                   DURATION.labels(*labels))


class _FlushHotKeys(Stage):
    """Last stage: between messages, the hot-key counts go to the metrics files."""

    name = "metrics"

    def __init__(self, hot: HotKeys) -> None:
        self.hot = hot

    def between(self, idle: bool) -> float | None:
        self.hot.flush()
        return None
