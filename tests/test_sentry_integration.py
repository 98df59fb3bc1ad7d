"""Third-party SDKs see partitioned tasks: Sentry initialised in any worker signal a plain
worker honours captures a failing partitioned task run by a real partition worker.

Sentry's Celery integration patches ``celery.app.trace.build_tracer`` when ``sentry_sdk.init``
runs; a tracer built through a name bound before that bypasses it. Three real
``celery partitioning worker`` commands, each pinned to one partition of the pool, initialise
Sentry in ``celeryd_init``, ``worker_init`` and ``worker_process_init`` respectively; events
go through a local transport to Redis (no network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from celery_partitioning import partition_for
from tests.support.procs import ROOT, Processes, celery_bin, wait_for

pytest.importorskip("sentry_sdk")
pytestmark = pytest.mark.integration

SIGNALS = ("celeryd_init", "worker_init", "worker_process_init")


@pytest.mark.timeout(180)
def test_sentry_initialised_in_each_worker_signal_captures_a_failing_partitioned_task(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    env = {"CP_REDIS_URL": url, "CP_NS": namespace, "PYTHONPATH": str(ROOT)}
    os.environ.update(env)  # the app module reads them at import (this process never inits)
    try:
        from tests.apps import sentry_app
    finally:
        for name in env:
            os.environ.pop(name, None)
    app = sentry_app.app
    app.conf.update(broker_url=url, broker_transport_options={"global_keyprefix": namespace},
                    partitioning_queue_prefix=f"{namespace}partition")
    client = redis.Redis.from_url(url, decode_responses=True)

    # Given one partition worker per signal, each pinned to its own partition
    for index, signal in enumerate(SIGNALS):
        processes.start([celery_bin(), "-A", "tests.apps.sentry_app", "partitioning", "worker",
                         "-l", "info", "--pool", "s", "--partitions", str(index),
                         "--processes", "1", "--stop-timeout", "30"],
                        env={**env, "CP_SENTRY_SIGNAL": signal}, log=tmp_path / f"{signal}.log")
    wait_for(lambda: client.llen(f"{namespace}sentry-init") == len(SIGNALS), 90,
             "Sentry initialised in every worker")

    # When a failing partitioned task runs in each of them
    keys = {}
    for n in range(200):
        keys.setdefault(partition_for(f"k{n}", 3), f"k{n}")
    assert sorted(keys) == [0, 1, 2]
    for index in range(3):
        app.tasks["sentry.fail"].delay(keys[index])

    # Then each worker sent Sentry the task's exception, through the Celery integration
    def events() -> list[dict[str, str]]:
        return [json.loads(e) for e in client.lrange(f"{namespace}sentry", 0, -1)]

    def logs() -> str:
        return "\n".join(f"--- {s}\n" + (tmp_path / f"{s}.log").read_text(errors="replace")[-2000:]
                         for s in SIGNALS)

    try:
        wait_for(lambda: {e["signal"] for e in events()} == set(SIGNALS), 60,
                 "an event from every worker")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {events()}\n{logs()}") from None
    by_signal = {s: [e for e in events() if e["signal"] == s] for s in SIGNALS}
    for index, signal in enumerate(SIGNALS):
        [event] = by_signal[signal]
        assert event["type"] == "ValueError", event
        assert event["value"] == f"sentry test failure {keys[index]}", event
        assert event["mechanism"] == "celery", event
