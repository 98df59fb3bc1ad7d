"""The lease heartbeat fences a process whose partition thread is stuck (issue 27).

Given a lease held on a real Redis whose ``stall_check`` is a partition thread's Progress,
when that thread blocks outside a task body (here: on an event nobody sets, as a fetch on a
socket that never answers would) for longer than the stall limit,
then the heartbeat fences with a reason that shows where the thread waits; while the thread
is inside a task body (Celery's task_prerun .. task_postrun), it is never counted stalled.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from celery_partitioning.store.keys import RedisKeys
from celery_partitioning.store.lease import Lease
from celery_partitioning.store.progress import read_progress
from celery_partitioning.worker.progress import Progress, _task_ended, _task_started

pytestmark = pytest.mark.integration


def _stuck_in_fetch(progress: Progress, release: threading.Event, bound: threading.Event) -> None:
    progress.bind()
    bound.set()
    release.wait(30)  # a fetch that never returns


def test_a_stuck_partition_thread_fences_its_process(store_redis: Any, namespace: str) -> None:
    progress = Progress(stall_after=0.5)
    release, bound = threading.Event(), threading.Event()
    thread = threading.Thread(target=_stuck_in_fetch, args=(progress, release, bound), daemon=True)
    thread.start()
    assert bound.wait(5)
    fenced: list[str] = []
    done = threading.Event()

    def fence(reason: str) -> None:
        fenced.append(reason)
        done.set()

    keys = RedisKeys(namespace)
    lease = Lease(store_redis, keys.lease(f"{namespace}q"), 0.6, fence=fence)
    assert lease.try_acquire()
    lease.stall_check = progress.stall
    lease.on_beat.append(progress.recorder(store_redis, keys, f"{namespace}q", expire_ms=2000))
    try:
        lease.start_heartbeat()
        assert done.wait(10), "the heartbeat went on renewing for a stuck thread"
    finally:
        release.set()
        lease.release()
        thread.join(5)
    assert "has not come round" in fenced[0] and "_stuck_in_fetch" in fenced[0], fenced[0]
    # before it fenced, the heartbeat recorded when the thread last consumed
    assert read_progress(store_redis, keys, [f"{namespace}q"])[f"{namespace}q"] is not None


def test_a_long_task_body_is_not_a_stall() -> None:
    progress = Progress(stall_after=0.0)
    seen: list[str | None] = []

    def run() -> None:
        progress.bind()
        _task_started()
        seen.append(progress.stall())  # inside the body: busy
        _task_ended()
        progress.turned_at -= 1  # and a second without coming round after it
        seen.append(progress.stall())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert seen[0] is None
    assert seen[1] is not None and "run" in seen[1]
