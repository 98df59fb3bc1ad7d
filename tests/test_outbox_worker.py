"""The outbox relay as a thread of `partitioning worker` (real processes, SQLite, Redis):
on by default where the Django outbox exists, one per command, off by a flag or a setting."""

from __future__ import annotations

import os
import signal
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import Processes, alive, celery_bin, wait_for
from tests.test_outbox import _run

#: Commits events key "a" from..to (inclusive) through the outbox, in one transaction.
COMMIT = textwrap.dedent("""
    import json, sys
    from django.db import transaction
    from tests.apps import outbox_app as oa
    from celery_partitioning.contrib.django import outbox
    first, last = int(sys.argv[1]), int(sys.argv[2])
    with transaction.atomic():
        outbox.publish_many([oa.apply_event.s(key="a", seq=s, event_id=f"a{s}")
                             for s in range(first, last + 1)])
    print("{}")
""")



def _read(env: dict[str, str]) -> dict[str, Any]:
    """What the projection applied, in order, and how many outbox rows wait: read straight
    from the SQLite file (a wait polls it; a Django process per reading took a second)."""
    conn = sqlite3.connect(env["CP_DB"], timeout=30)
    try:
        applied = [list(r) for r in conn.execute("SELECT key, seq FROM applied ORDER BY id")]
        (waiting,) = conn.execute("SELECT count(*) FROM celery_partitioning_outboxmessage").fetchone()
    finally:
        conn.close()
    return {"applied": applied, "waiting": waiting}


def _commit(env: dict[str, str], first: int, last: int) -> None:
    _run(env, f"import sys; sys.argv = ['x', '{first}', '{last}']\n" + COMMIT)


def _relay_holder(client: Any, namespace: str) -> int | None:
    for key in client.scan_iter(match=f"{namespace}cp:lease:outbox:*"):
        value = client.get(key)
        return int(value.decode().split("|")[2]) if value else None
    return None


@pytest.mark.integration
def test_the_worker_relays_the_outbox_by_default_and_after_a_kill_of_its_process(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    import redis

    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace, "CP_DB": str(tmp_path / "o.sqlite3")}
    _run(env, "from tests.apps import outbox_app as oa; oa.create_tables(); print('{}')")
    client = redis.Redis.from_url(redis_url)
    # Given five events committed through the outbox before any worker runs
    _commit(env, 1, 5)
    # When a partition worker of two processes starts, and no `outbox relay` command
    log = tmp_path / "worker.log"
    processes.start([celery_bin(), "-A", "tests.apps.outbox_app", "partitioning", "worker",
                     "-l", "info", "--processes", "2"], env=env, log=log)
    # Then it relays them: applied in order, the outbox empty
    wait_for(lambda: _read(env) == {"applied": [["a", s] for s in range(1, 6)],
                                         "waiting": 0}, 60, f"the worker to relay ({log})")
    # and its banner says so, in one of its two processes only
    assert log.read_text().count("[outbox relay]") == 1
    assert "database default: on" in log.read_text()
    # When the process running the relay is SIGKILLed, and more events commit
    holder = _relay_holder(client, namespace)
    assert holder is not None
    os.kill(holder, signal.SIGKILL)
    wait_for(lambda: not alive(holder), 10, "the relay's process to go")
    _commit(env, 6, 10)
    # Then the restarted process relays them, after the first five, in order
    wait_for(lambda: _read(env)["waiting"] == 0, 60, f"the restarted relay ({log})")
    wait_for(lambda: len(_read(env)["applied"]) >= 10, 60, "the events to be applied")
    assert _read(env)["applied"] == [["a", s] for s in range(1, 11)]
    assert _relay_holder(client, namespace) not in (None, holder)
    client.close()


@pytest.mark.integration
@pytest.mark.parametrize("opt_out", ["--without-relay", "partitioning_outbox_relay=False"])
def test_with_the_opt_out_the_worker_runs_no_relay(
        opt_out: str, redis_url: str, namespace: str, processes: Processes,
        tmp_path: Path) -> None:
    import redis

    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace, "CP_DB": str(tmp_path / "o.sqlite3")}
    _run(env, "from tests.apps import outbox_app as oa; oa.create_tables(); print('{}')")
    _commit(env, 1, 3)
    flags = ["--without-relay"] if opt_out.startswith("--") else []
    if not flags:
        env["CP_OUTBOX_RELAY"] = "0"
    log = tmp_path / "worker.log"
    # Given a partition worker started with the opt-out
    processes.start([celery_bin(), "-A", "tests.apps.outbox_app", "partitioning", "worker",
                     "-l", "info", "--processes", "1", *flags], env=env, log=log)
    # When it has applied a call published directly (so it is up and consuming)
    _run(env, "from tests.apps import outbox_app as oa; "
              "oa.apply_event.delay(key='b', seq=1, event_id='direct'); print('{}')")
    wait_for(lambda: ["b", 1] in _read(env)["applied"], 60, f"the worker ({log})")
    # Then the outbox rows are still waiting, no relay holds or waits for the lease
    assert _read(env) == {"applied": [["b", 1]], "waiting": 3}
    client = redis.Redis.from_url(redis_url)
    assert _relay_holder(client, namespace) is None
    client.close()
    assert "[outbox relay]" not in log.read_text()
