"""The outbox end to end on PostgreSQL with real processes: concurrent producers, one
transaction in five rolled back after its publish, the active relay SIGKILLed several times
and the partition worker process twice;
every committed event applied exactly once, in per-key order, and nothing else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import ROOT, Processes, alive, celery_bin, wait_for
from tests.test_checkpoints import postgres_db  # noqa: F401 - the fixture

PRODUCERS, TRANSACTIONS, KEYS, PER_TRANSACTION, ROLLBACK_EVERY = 3, 50, 12, 3, 5
KILLS, WORKER_KILLS = 3, 2


def _pg(dbname: str) -> Any:
    import psycopg

    return psycopg.connect(host=os.environ.get("CP_PG_HOST", "/var/run/postgresql"),
                           user="postgres", dbname=dbname, autocommit=True)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _lease_holder_pid(client: Any, namespace: str) -> int | None:
    for key in client.scan_iter(match=f"{namespace}cp:lease:outbox:*"):
        value = client.get(key)
        if value:
            return int(value.decode().split("|")[2])
    return None


@pytest.mark.integration
def test_every_committed_event_runs_once_in_key_order_through_relay_kills(
        redis_url: str, namespace: str, postgres_db: str,  # noqa: F811
        processes: Processes, tmp_path: Path) -> None:
    import redis

    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace, "CP_PG_DB": postgres_db}
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    setup = subprocess.run(
        [sys.executable, "-c", "from tests.apps import outbox_app as oa; oa.create_tables()"],
        env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-3000:]
    client = redis.Redis.from_url(redis_url)
    db = _pg(postgres_db)

    def count(sql: str) -> int:
        row = db.execute(sql).fetchone()
        return int(row[0]) if row else 0

    # Given a partition worker (its own relay off: the relays here are the commands, so
    # each kill hits a relay alone) and two relays (one active, one standby)
    app_argv = [celery_bin(), "-A", "tests.apps.outbox_app", "partitioning"]
    supervisor = processes.start([*app_argv, "worker", "-l", "info", "--processes", "1",
                                  "--without-relay"], env=env, log=tmp_path / "worker.log")
    relay_log = tmp_path / "relay.log"

    def start_relay() -> subprocess.Popen[bytes]:
        return processes.start([*app_argv, "outbox", "relay", "--poll", "0.2", "--batch", "50"],
                               env=env, log=relay_log)

    relays = [start_relay(), start_relay()]
    # and producers running transactions of three events over twelve keys, concurrently,
    # every fifth one rolled back after outbox.publish_many, until the kills are done
    producers = []
    stop_file = tmp_path / "stop-producing"
    for seed in range(PRODUCERS):
        out = open(tmp_path / f"producer-{seed}.json", "wb")
        producers.append(subprocess.Popen(
            [sys.executable, "-c", "import json; from tests.apps import outbox_app as oa; "
             f"print(json.dumps(oa.produce({TRANSACTIONS}, {KEYS}, {PER_TRANSACTION}, "
             f"{ROLLBACK_EVERY}, {seed}, {str(stop_file)!r})))"],
            env=full_env, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, start_new_session=True))
        processes.started.append(producers[-1])

    # When the active relay is SIGKILLed three times while the producers run, each time
    # after it took the lease and relayed something, with rows still waiting in the outbox
    kills = 0
    holder: tuple[int, int] | None = None  # (pid, applied when first seen holding)
    deadline = time.monotonic() + 90
    while kills < KILLS:
        assert time.monotonic() < deadline, f"kills stalled at {kills}; see {relay_log}"
        pid = _lease_holder_pid(client, namespace)
        victim = next((r for r in relays if r.pid == pid), None)
        applied = count("SELECT count(*) FROM applied")
        if victim is None:  # free, or still the killed one's until its TTL runs out
            time.sleep(0.05)
            continue
        if holder is None or holder[0] != victim.pid:
            holder = (victim.pid, applied)
        if applied <= holder[1] or not count("SELECT count(*) FROM celery_partitioning_outboxmessage"):
            time.sleep(0.05)
            continue
        assert all(p.poll() is None for p in producers), "a producer stopped early"
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda p=victim.pid: not alive(p), 10, "the killed relay to go")
        victim.wait(10)
        relays.remove(victim)
        relays.append(start_relay())
        kills += 1
    # and the partition worker process twice, each time after it applied something more
    for _ in range(WORKER_KILLS):
        before = count("SELECT count(*) FROM applied")
        wait_for(lambda b=before: count("SELECT count(*) FROM applied") > b, 60,
                 "the worker to apply more")
        wait_for(lambda: len(_children(supervisor.pid)) == 1, 60, "a worker process")
        child = _children(supervisor.pid)[0]
        os.kill(child, signal.SIGKILL)
        wait_for(lambda c=child: c not in _children(supervisor.pid), 10, "the worker to go")
    stop_file.touch()
    for producer in producers:
        producer.wait(120)
        assert producer.returncode == 0, producer.stderr.read().decode()[-3000:] if producer.stderr else ""
    produced = [json.loads((tmp_path / f"producer-{seed}.json").read_text().strip().splitlines()[-1])
                for seed in range(PRODUCERS)]
    committed = {e for p in produced for e in p["committed"]}
    rolled_back = {e for p in produced for e in p["rolled_back"]}
    assert len(rolled_back) >= PRODUCERS * PER_TRANSACTION * (TRANSACTIONS // ROLLBACK_EVERY)
    assert len(committed) >= 3 * len(rolled_back)

    def all_applied() -> bool:
        return (count("SELECT count(DISTINCT event_id) FROM applied") >= len(committed)
                and count("SELECT count(*) FROM celery_partitioning_outboxmessage") == 0)

    try:
        wait_for(all_applied, 90, f"every committed event to be applied (see {tmp_path})",
                 interval=0.2)
    except AssertionError:
        for relay in relays:  # their stacks, into relay.log
            os.kill(relay.pid, signal.SIGUSR1)
        time.sleep(1)
        raise
    # Then every committed event was applied exactly once
    applied_rows = db.execute("SELECT key, seq, event_id FROM applied ORDER BY id").fetchall()
    applied_ids = [e for _, _, e in applied_rows]
    assert len(applied_ids) == len(set(applied_ids)), "an event was applied twice"
    assert set(applied_ids) == committed
    # and no event of a rolled-back transaction ever ran
    assert not rolled_back & set(applied_ids)
    # and each key's events were applied in commit order (its sequence numbers, gap-free
    # because a rolled-back transaction's numbers roll back with it)
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, seq, _ in applied_rows:
        per_key[key].append(seq)
    events = dict(db.execute("SELECT key, max(seq) FROM events GROUP BY key").fetchall())
    assert {k: list(range(1, events[k] + 1)) for k in events} == dict(per_key)
    # and the outbox is empty
    assert count("SELECT count(*) FROM celery_partitioning_outboxmessage") == 0
    assert kills == KILLS
    assert supervisor.poll() is None  # it restarted the killed worker process both times
    db.close()
    client.close()
