"""A partition worker process is a Celery worker to the toolbox: signals, results, requests.

A real ``celery partitioning worker`` (two partitions as threads of one process) on a real
Redis with a Redis result backend runs bind=True tasks that succeed, retry in place and fail;
what Celery's signals, the result backend and ``self.request`` show is recorded and compared
with what a plain worker shows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from tests.support.procs import ROOT, Processes, celery_bin, wait_for


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_signals_results_and_request_fields_behave_as_on_a_plain_worker(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    env = {"CP_REDIS_URL": url, "CP_NS": namespace, "PYTHONPATH": str(ROOT)}
    os.environ.update(env)  # the app module below reads them at import
    try:
        from tests.apps import toolbox_app
    finally:
        for name in env:
            os.environ.pop(name, None)
    app = toolbox_app.app
    app.conf.update(broker_url=url, result_backend=url,
                    broker_transport_options={"global_keyprefix": namespace},
                    result_backend_transport_options={"global_keyprefix": namespace},
                    partitioning_queue_prefix=f"{namespace}partition")
    client = redis.Redis.from_url(url, decode_responses=True)
    log = tmp_path / "worker.log"
    supervisor = processes.start([celery_bin(), "-A", "tests.apps.toolbox_app", "partitioning", "worker",
                     "-l", "info", "--processes", "1", "--stop-timeout", "30"],
                    env=env, log=log)

    # Given a success, an in-place retry that then succeeds, and a failure
    ok = toolbox_app.echo.delay("a")
    retried = toolbox_app.echo.delay("b", retry_once=True)
    set_aside = toolbox_app.echo.delay("d", retry_once=True, countdown=0.3)
    failed = toolbox_app.boom.delay("c")

    # Then the result backend has every outcome
    assert ok.get(timeout=60) == "echo a after 0 retries"
    assert retried.get(timeout=60) == "echo b after 1 retries"
    assert set_aside.get(timeout=60) == "echo d after 1 retries"
    with pytest.raises(ValueError, match="boom c"):
        failed.get(timeout=60, propagate=True)
    assert failed.state == "FAILURE"

    # And worker_process_init ran once, in the partition worker process
    import psutil

    [child] = psutil.Process(supervisor.pid).children()
    assert client.lrange(f"{namespace}process_init", 0, -1) == [str(child.pid)]

    # And every task signal fired, in the partition thread that ran the task
    def fired() -> list[str]:
        return client.lrange(f"{namespace}signals", 0, -1)

    wait_for(lambda: len(fired()) >= 18, 30, "the task signals")
    by_task: dict[str, list[str]] = {}
    threads: set[str] = set()
    for line in fired():
        what, task_id, thread = line.split(" ", 2)
        by_task.setdefault(task_id, []).append(what)
        threads.add(thread)
    assert by_task[ok.id] == ["prerun", "success", "postrun:SUCCESS"], by_task
    # (an in-place retry, here with no delay, never leaves its place, yet each attempt has
    # its own prerun and postrun, the first ending as RETRY, as on a plain worker)
    assert by_task[retried.id] == ["prerun", "retry", "postrun:RETRY",
                                   "prerun", "success", "postrun:SUCCESS"], by_task
    # (a longer backoff sets the key aside: the attempt ends as RETRY, as on a plain worker,
    # and the message runs again when due)
    assert by_task[set_aside.id] == ["prerun", "retry", "postrun:RETRY",
                                     "prerun", "success", "postrun:SUCCESS"], by_task
    assert by_task[failed.id] == ["prerun", "failure", "postrun:FAILURE"], by_task
    assert threads and all(t.startswith("partition-entity.") for t in threads), threads

    # And self.request carries what a plain worker's would
    requests = [json.loads(r) for r in client.lrange(f"{namespace}requests", 0, -1)]
    first = next(r for r in requests if r["id"] == ok.id)
    assert first["args"] == ["a"] and first["retries"] == 0 and first["is_eager"] is False
    assert first["hostname"].startswith("partitions0@")
    assert first["routing_key"].startswith(f"{namespace}partition.entity.")
    assert first["partition_key"] == "Order:a"
    assert [r["retries"] for r in requests if r["id"] == retried.id] == [0, 1]
