"""Pausing and resuming a key or a partition with real partition workers on a real Redis.

``partitioning pause --key K`` sets K's messages aside in order while other keys go on;
``resume`` runs them next, in order, ahead of newer ones. ``pause --partition pool.N`` stops
its holder between two messages with its lease kept (a standby does not take over); ``resume``
lets it run everything in order. The commands are run as an operator would (the real CLI).
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from celery_partitioning.store.broker import FETCH_TIMEOUT
from celery_partitioning.store.keys import RedisKeys
from celery_partitioning.worker.pausing import CHECK
from tests.support.failures import env_of, start_partition_worker
from tests.support.procs import ROOT, Processes, celery_bin, wait_for
from tests.test_deadletters_integration import orders_on_one_partition, parked_len
from tests.test_skip_integration import runs

pytestmark = pytest.mark.integration


def partitioning(fa: ModuleType, *args: str) -> subprocess.CompletedProcess[str]:
    """The real program: ``celery -A tests.apps.failures_app partitioning ...``."""
    return subprocess.run(
        [celery_bin(), "-A", "tests.apps.failures_app", "partitioning", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env_of(fa)}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False)


def status_of(fa: ModuleType, index: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``status --json`` row of partition ``index`` of ``entity``, and what is paused."""
    out = partitioning(fa, "status", "--pool", "entity", "--json")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    (row,) = [r for r in found["partitions"] if r["index"] == index]
    return row, found["paused"]


def test_a_paused_key_waits_while_other_keys_run_and_resume_runs_it_first_in_order(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    key_pause_keeps_order(fa, processes, tmp_path)


def key_pause_keeps_order(fa: ModuleType, processes: Processes, tmp_path: Path) -> None:
    """The key scenario, on whatever broker ``fa`` uses (tests/test_deadletters_rabbitmq.py
    runs it on RabbitMQ)."""
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p, q) = orders_on_one_partition(fa, 2)
    key = f"Order:{p}"
    start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    # Given P and Q flowing on one partition
    fa.step.delay(p, 0)
    fa.step.delay(q, 0)
    wait_for(lambda: client.llen(f"{fa.NS}ran") == 2, 60, "P0 and Q0 to run")
    # When the operator pauses P through the real CLI while more of P and Q arrive
    paused = partitioning(fa, "pause", "--key", key, "--pool", "entity", "--json")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["pause"]["by"] == getpass.getuser()
    held = [fa.step.delay(p, seq).id for seq in (1, 2, 3)]
    for seq in (1, 2):
        fa.step.delay(q, seq)
    # Then Q goes on and P's messages are set aside in order, none of them run
    wait_for(lambda: client.lrange(f"{fa.NS}rec:Order:{q}", -1, -1) == ["end 2"]
             and parked_len(client, fa, p) == 3, 60, "Q1, Q2 to run and P1-P3 set aside")
    assert client.lrange(f"{fa.NS}rec:{key}", 0, -1) == runs([0])
    set_aside = client.lrange(RedisKeys(fa.NS).parked("entity", key), 0, -1)
    assert [json.loads(m)["headers"]["id"] for m in set_aside] == held
    # And status shows the pause: which key, since when, by whom; no dead letter
    row, pauses = status_of(fa, index)
    assert (row["paused_keys"], row["paused"], row["parked_keys"]) == (1, None, 0), row
    (pause,) = pauses
    assert (pause["key"], pause["pool"], pause["partition"], pause["by"]) == (
        key, "entity", index, getpass.getuser())
    # When the operator resumes P, and newer messages of P are published right after
    resumed = partitioning(fa, "resume", "--key", key, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert [m["id"] for m in json.loads(resumed.stdout)["messages"]] == held
    for seq in (4, 5):
        fa.step.delay(p, seq)
    # Then P1-P3 run in order, ahead of P4, P5
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 5"], 60, "P5 to run")
    assert client.lrange(f"{fa.NS}rec:{key}", 0, -1) == runs(range(6))
    assert [line for line in client.lrange(f"{fa.NS}ran", 0, -1) if line.startswith(key)] == [
        f"{key} {seq}" for seq in range(6)]
    assert status_of(fa, index)[1] == []


def _lease_renewed(client: redis.Redis, name: str, times: int) -> None:
    """Wait until the lease ``name`` has been renewed ``times`` times (its TTL jumped up from
    one reading to the next); it must never lapse meanwhile."""
    seen, last = 0, client.pttl(name)

    def renewed() -> bool:
        nonlocal last
        now = client.pttl(name)
        assert now > 0, "the lease lapsed while the partition was paused"
        jumped, last = now > last, now
        return jumped

    while seen < times:
        wait_for(renewed, 10, "a lease renewal", interval=0.02)
        seen += 1


def test_a_paused_partition_keeps_its_lease_runs_nothing_and_resume_runs_all_in_order(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p, q) = orders_on_one_partition(fa, 2)
    lease = RedisKeys(fa.NS).lease(f"{fa.NS}partition.entity.{index}")
    start_partition_worker(processes, fa, "entity", index, tmp_path / "w1.log")
    fa.step.delay(p, 0)
    fa.step.delay(q, 0)
    wait_for(lambda: client.llen(f"{fa.NS}ran") == 2, 60, "P0 and Q0 to run")
    holder = client.get(lease)
    # Given a standby for the partition
    start_partition_worker(processes, fa, "entity", index, tmp_path / "w2.log")
    # When the operator pauses the partition: the command returns once the holder stopped
    paused = partitioning(fa, "pause", "--partition", f"entity.{index}", "--json")
    assert paused.returncode == 0, paused.stderr
    out = json.loads(paused.stdout)
    assert out["stopped"] and out["pause"]["stopped_by"], out
    noticed = (datetime.fromisoformat(out["pause"]["stopped_at"])
               - datetime.fromisoformat(out["pause"]["at"])).total_seconds()
    print(f"the holder stopped {noticed:.2f}s after the pause was written")
    # The command wakes the idle holder's fetch, which then reads the record (0.01 s here); the
    # bound is the fallback's, for a wake the server refused: the fetch's time-out, the
    # process's last read of the pauses (up to CHECK old), and a second of round trips.
    # (tests/test_inprocess_worker.py shows the wake itself, with a fetch that would not end.)
    assert noticed < FETCH_TIMEOUT + CHECK + 1
    for seq in (1, 2):
        fa.step.delay(p, seq)
        fa.step.delay(q, seq)
    # Then while the lease is renewed (the TTL is 2 s) by the same holder, nothing runs
    _lease_renewed(client, lease, 5)
    assert client.get(lease) == holder
    assert client.llen(f"{fa.NS}ran") == 2
    row, pauses = status_of(fa, index)
    assert row["depth"] == 4 and row["paused"]["by"] == getpass.getuser()
    assert row["paused"]["stopped_by"] and not row["stalled"]
    assert [(x["key"], x["partition"]) for x in pauses] == [(None, index)]
    # When the operator resumes it
    resumed = partitioning(fa, "resume", "--partition", f"entity.{index}")
    assert resumed.returncode == 0 and "fetches again" in resumed.stdout, resumed.stderr
    # Then everything runs, in publish order, on the same holder
    wait_for(lambda: client.llen(f"{fa.NS}ran") == 6, 60, "the four messages to run")
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"Order:{p} 0", f"Order:{q} 0", f"Order:{p} 1", f"Order:{q} 1", f"Order:{p} 2",
        f"Order:{q} 2"]
    assert client.get(lease) == holder
    assert status_of(fa, index)[0]["paused"] is None


def test_a_partition_paused_before_any_holder_runs_nothing_once_a_worker_takes_it(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p, q) = orders_on_one_partition(fa, 2)
    lease = RedisKeys(fa.NS).lease(f"{fa.NS}partition.entity.{index}")
    # Given a partition paused while no worker holds it, with messages waiting
    paused = partitioning(fa, "pause", "--partition", f"entity.{index}", "--wait", "0")
    assert paused.returncode == 0, paused.stderr
    assert "the next holder stops before its first message" in paused.stdout, paused.stdout
    fa.step.delay(p, 0)
    fa.step.delay(q, 0)
    # When a worker starts and takes the partition's lease
    start_partition_worker(processes, fa, "entity", index, tmp_path / "w.log")
    wait_for(lambda: client.exists(lease), 60, "the worker to take the lease")
    # Then it runs nothing while it keeps the lease, and says it stopped for the pause
    _lease_renewed(client, lease, 3)
    assert client.llen(f"{fa.NS}ran") == 0
    wait_for(lambda: status_of(fa, index)[0]["paused"]["stopped_by"], 30, "the acknowledgement")
    # And resume runs the waiting messages in order
    resumed = partitioning(fa, "resume", "--partition", f"entity.{index}")
    assert resumed.returncode == 0, resumed.stderr
    wait_for(lambda: client.llen(f"{fa.NS}ran") == 2, 60, "the two messages to run")
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"Order:{p} 0", f"Order:{q} 0"]


def test_the_commands_say_what_is_wrong_and_change_nothing(fa: ModuleType) -> None:
    def fails(*args: str) -> str:
        out = partitioning(fa, *args)
        assert out.returncode == 1, (out.stdout, out.stderr)
        return out.stderr

    assert "unknown partition entity.9: pool entity has partitions 0-1" in fails(
        "pause", "--partition", "entity.9")
    assert "no pool 'nope'" in fails("pause", "--partition", "nope.0")
    assert "may be in any of the pools entity, dcb: pass --pool" in fails(
        "pause", "--key", "Order:1")
    assert "key 'Order:1' of pool entity is not paused; nothing to resume" in fails(
        "resume", "--key", "Order:1", "--pool", "entity")
    assert "is paused in no pool (entity, dcb)" in fails("resume", "--key", "Order:1")
    assert "partition entity.0 is not paused" in fails("resume", "--partition", "entity.0")
    both = partitioning(fa, "pause", "--key", "Order:1", "--partition", "entity.0")
    assert both.returncode == 2 and "either --key KEY or --partition" in both.stderr
    # pausing twice says so; resuming twice names the resume
    assert partitioning(fa, "pause", "--key", "Order:1", "--pool", "entity").returncode == 0
    again = partitioning(fa, "pause", "--key", "Order:1", "--pool", "entity")
    assert again.returncode == 0 and "is paused already (since" in again.stdout
    assert partitioning(fa, "resume", "--key", "Order:1").returncode == 0
    assert "it was resumed at" in fails("resume", "--key", "Order:1", "--pool", "entity")
    assert partitioning(fa, "pause", "--partition", "entity.1", "--wait", "0").returncode == 0
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    assert client.llen(RedisKeys(fa.NS).pause_log("entity")) == 3
