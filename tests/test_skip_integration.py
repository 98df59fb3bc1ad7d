"""Going past a failed message with real partition workers on a real Redis.

``dead-letters skip --key K`` drops the failed message (a record kept), unparks the key and
runs the messages parked behind it next, in order, ahead of newer ones; a task with
``on_failure="skip"`` dead-letters its failed message and its key goes on, never parked.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import redis

from celery_partitioning.store.deadletters import DeadLetterStore
from celery_partitioning.store.keys import RedisKeys
from tests.support.failures import start_partition_worker
from tests.support.procs import Processes, wait_for
from tests.test_deadletters_integration import cli, orders_on_one_partition, parked_len

pytestmark = pytest.mark.integration


def runs(seqs: range | list[int]) -> list[str]:
    """The records of messages that ran to their end, in this order."""
    return [f"{kind} {s}" for s in seqs for kind in ("start", "end")]


def test_skip_drops_the_failed_message_and_runs_the_parked_ones_next_in_order(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p, q) = orders_on_one_partition(fa, 2)
    key = f"Order:{p}"
    # Given a poison message P0 with four good messages of P behind it, and Q on the partition
    client.set(f"{fa.NS}poison:{p}:0", "malformed event")
    ids = [fa.step.delay(p, 0).id]
    fa.step.delay(q, 0)
    ids += [fa.step.delay(p, seq).id for seq in range(1, 5)]
    start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    # When the worker runs them: P0 fails and parks P; P1-P4 wait behind it, Q goes on
    wait_for(lambda: parked_len(client, fa, p) == 4 and client.llen(f"{fa.NS}rec:Order:{q}") == 2,
             60, "P1-P4 parked and Q done")
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"{key} 0", f"Order:{q} 0"]

    # When the operator skips the failed message through the real CLI (the fault NOT fixed)
    skipped = cli(fa, "skip", "--key", key, "--json")
    assert skipped.returncode == 0, skipped.stderr
    out = json.loads(skipped.stdout)
    # and publishes newer messages of P right after
    newer = [fa.step.delay(p, seq).id for seq in (5, 6)]
    # Then the skip names the failed message and the four it released, in order
    assert (out["action"], out["skipped"]["id"], out["via"]) == ("skip", ids[0], "head")
    assert [m["id"] for m in out["messages"]] == ids[1:]
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 6"], 60, "P6 to run")
    # And P0 did not run again, P1-P4 ran in order, then the newer P5, P6
    assert client.lrange(f"{fa.NS}rec:{key}", 0, -1) == ["start 0", *runs(range(1, 7))]
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"{key} 0", f"Order:{q} 0", *[f"{key} {seq}" for seq in range(1, 7)]]
    # And the failed message is kept in the dead-letter log, with its raw message
    (event,) = DeadLetterStore(client, RedisKeys(fa.NS)).history("entity")
    assert (event["action"], event["key"], event["skipped"]["id"]) == ("skip", key, ids[0])
    assert event["dead_letter"]["error"] == f"ValueError: poison message {key} 0"
    assert json.loads(event["raw"][0])["headers"]["id"] == ids[0]
    assert [m["id"] for m in event["messages"]] == ids[1:]
    # And nothing is parked or dead-lettered; skipping again is an error that changes nothing
    assert cli(fa, "list").stdout.strip() == "no dead letters"
    again = cli(fa, "skip", "--key", key)
    assert again.returncode == 1 and "not parked: it was skipped at" in again.stderr, again.stderr
    assert newer and client.llen(f"{fa.NS}ran") == 8


def test_skip_of_a_key_with_nothing_parked_only_unparks_it(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p,) = orders_on_one_partition(fa, 1)
    key = f"Order:{p}"
    client.set(f"{fa.NS}poison:{p}:0", "bad")
    fa.step.delay(p, 0)
    start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    store = DeadLetterStore(client, RedisKeys(fa.NS))
    wait_for(lambda: store.is_parked("entity", key), 60, "P parked")
    out = cli(fa, "skip", "--key", key, "--pool", "entity")
    assert out.returncode == 0, out.stderr
    assert "released 0 message(s)" in out.stdout and "skipped" in out.stdout
    fa.step.delay(p, 1)
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 1"], 60, "P1 to run")
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"{key} 0", f"{key} 1"]


def test_on_failure_skip_dead_letters_the_message_and_the_key_goes_on(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    store = DeadLetterStore(client, RedisKeys(fa.NS))
    index, (p, q) = orders_on_one_partition(fa, 2)
    key = f"Order:{p}"
    # Given a task with on_failure="skip" and a poison message P1 between good ones of P, and
    # Q0 failing with a fault it retries once (its key set aside 0.2 s) before giving up
    client.set(f"{fa.NS}poison:{p}:1", "malformed event")
    client.set(f"{fa.NS}poison:{q}:0", "transient")
    ids = [fa.skipping.delay(p, seq).id for seq in range(5)]
    q_ids = [fa.skipping.delay(q, seq).id for seq in range(3)]
    start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 4"]
             and client.lrange(f"{fa.NS}rec:Order:{q}", -1, -1) == ["end 2"], 60,
             "P4 and Q2 to run")
    # Then Q0 ran twice (its retry), Q1, Q2 after it, in order; Q was never parked
    assert client.lrange(f"{fa.NS}rec:Order:{q}", 0, -1) == ["start 0", "start 0",
                                                             *runs(range(1, 3))]
    assert not store.is_parked("entity", f"Order:{q}")
    # Then P1 failed once, and P's later messages ran in order without waiting for anyone
    assert client.lrange(f"{fa.NS}rec:{key}", 0, -1) == [*runs([0]), "start 1", *runs(range(2, 5))]
    assert [r for r in client.lrange(f"{fa.NS}ran", 0, -1) if r.startswith(f"{key} ")] == [
        f"{key} {seq}" for seq in range(5)]
    assert not store.is_parked("entity", key) and parked_len(client, fa, p) == 0
    # And P1 is a listed dead letter under the policy skip, with its error and traceback
    listed = cli(fa, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_key = {e["key"]: e for e in json.loads(listed.stdout)}
    assert sorted(by_key) == sorted([key, f"Order:{q}"])
    entry, retried = by_key[key], by_key[f"Order:{q}"]
    assert (entry["key"], entry["id"], entry["task"], entry["policy"], entry["reason"]) == (
        key, ids[1], "fail.skipping", "skip", "ERROR")
    assert (retried["id"], retried["policy"], retried["reason"], retried["attempts"]) == (
        q_ids[0], "skip", "MAX_RETRIES_EXCEEDED", 2)
    assert entry["error"] == f"ValueError: poison message {key} 1"
    assert "Traceback" in entry["traceback"] and entry["parked_count"] == 0
    table = cli(fa, "list", "--key", key)
    assert " skip " in table.stdout and ids[1] in table.stdout, table.stdout
    # And a later message of P runs at once
    fa.skipping.delay(p, 5)
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 5"], 60, "P5 to run")
    # And the operator can discard the record (logged); skip and replay are for parked keys
    refused = cli(fa, "skip", "--key", key, "--pool", "entity")
    assert refused.returncode == 1 and "no dead letter for key" in refused.stderr
    dropped = cli(fa, "discard", "--key", key, "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert [m["id"] for m in json.loads(dropped.stdout)["messages"]] == [ids[1]]
    assert cli(fa, "list", "--key", key).stdout.strip() == "no dead letters"
    (event,) = store.history("entity")
    assert (event["action"], event["dead_letter"]["policy"]) == ("discard", "skip")
