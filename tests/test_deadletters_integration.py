"""Dead letters, per-key parking and replay with real partition workers on a real Redis.

A poison message parks its key: later messages of the key are set aside in publish order while
other keys of the same partition go on; ``dead-letters replay`` runs them all, in order, ahead
of anything newer; a worker SIGKILLed while a key is parked or replaying loses nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import redis

from tests.support.failures import env_of, start_partition_worker
from tests.support.ordering import check
from tests.support.procs import ROOT, Processes, celery_bin, wait_for

pytestmark = pytest.mark.integration


def cli(fa: ModuleType, *args: str) -> subprocess.CompletedProcess[str]:
    """The real program: ``celery -A tests.apps.failures_app partitioning dead-letters ...``."""
    import os

    return subprocess.run(
        [celery_bin(), "-A", "tests.apps.failures_app", "partitioning", "dead-letters", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env_of(fa)}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False)


def orders_on_one_partition(fa: ModuleType, count: int) -> tuple[int, list[str]]:
    first = fa.cp.explain_route(fa.app, "fail.step", "p0", 0).index
    chosen = [o for o in (f"p{i}" for i in range(500))
              if fa.cp.explain_route(fa.app, "fail.step", o, 0).index == first][:count]
    return int(first), chosen


def parked_len(client: redis.Redis, fa: ModuleType, order: str) -> int:
    from celery_partitioning.store.keys import RedisKeys

    return int(client.llen(RedisKeys(fa.NS).parked("entity", f"Order:{order}")))


def test_poison_message_parks_its_key_others_go_on_and_replay_runs_it_in_order(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p, q) = orders_on_one_partition(fa, 2)
    key = f"Order:{p}"
    # Given a poison message P0, later messages of P, and Q on the same partition
    client.set(f"{fa.NS}poison:{p}:0", "bad data")
    ids = [fa.step.delay(p, 0).id, fa.step.delay(p, 1).id]
    fa.step.delay(q, 0)
    ids.append(fa.step.delay(p, 2).id)
    fa.step.delay(q, 1)
    ids.append(fa.step.delay(p, 3).id)
    # When the supervised partition worker runs them
    argv = [celery_bin(), "-A", "tests.apps.failures_app", "partitioning", "worker",
            "--pool", "entity", "--partitions", str(index), "-l", "info"]
    processes.start(argv, env=env_of(fa), log=tmp_path / "worker.log")
    wait_for(lambda: parked_len(client, fa, p) == 3 and client.llen(f"{fa.NS}rec:Order:{q}") == 4,
             60, "P1-P3 parked and Q done")
    # Then P0 failed once, P1-P3 did not run, Q ran
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"{key} 0", f"Order:{q} 0", f"Order:{q} 1"]
    listed = cli(fa, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert (entry["key"], entry["task"], entry["id"], entry["reason"], entry["attempts"]) == (
        key, "fail.step", ids[0], "ERROR", 1)
    assert entry["error"] == f"ValueError: poison message {key} 0"
    assert "Traceback" in entry["traceback"] and entry["failed_at"]
    assert [m["id"] for m in entry["parked"]] == ids[1:]
    table = cli(fa, "list", "--pool", "entity", "--key", key)
    assert key in table.stdout and "ERROR" in table.stdout and table.returncode == 0

    # And a message for P published while it is parked is parked behind the others
    ids.append(fa.step.delay(p, 4).id)
    wait_for(lambda: parked_len(client, fa, p) == 4, 30, "P4 parked")

    # When the fault is fixed and the key replayed
    client.delete(f"{fa.NS}poison:{p}:0")
    replayed = cli(fa, "replay", "--key", key, "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert [m["id"] for m in json.loads(replayed.stdout)["messages"]] == ids
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 4"], 30, "P4 to run")
    # Then a new message for P runs normally, after them
    fa.step.delay(p, 5)
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 5"], 30, "P5 to run")
    records = {key: client.lrange(f"{fa.NS}rec:{key}", 0, -1),
               f"Order:{q}": client.lrange(f"{fa.NS}rec:Order:{q}", 0, -1)}
    report = check(records, {key: 6, f"Order:{q}": 2})
    assert report.ok and report.reruns == 1, report.summary()
    assert client.lrange(f"{fa.NS}ran", 0, -1)[3:] == [f"{key} {i}" for i in range(6)]

    # And replaying again, or an unknown key, is a clear error that changes nothing
    again = cli(fa, "replay", "--key", key)
    assert again.returncode == 1 and "not parked: it was replayed at" in again.stderr, again.stderr
    unknown = cli(fa, "replay", "--key", "Order:nobody", "--pool", "entity")
    assert unknown.returncode == 1 and "no dead letter for key 'Order:nobody'" in unknown.stderr
    assert cli(fa, "list").stdout.strip() == "no dead letters"
    assert client.llen(f"{fa.NS}ran") == 9


def test_discard_drops_the_parked_messages_with_a_record_and_unparks_the_key(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p,) = orders_on_one_partition(fa, 1)
    key = f"Order:{p}"
    client.set(f"{fa.NS}poison:{p}:0", "bad")
    dropped = [fa.step.delay(p, 0).id, fa.step.delay(p, 1).id]
    start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: parked_len(client, fa, p) == 1, 30, "P1 parked")
    out = cli(fa, "discard", "--key", key)
    assert out.returncode == 0 and "discarded 2 message(s)" in out.stdout, out.stderr
    fa.step.delay(p, 2)
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 2"], 30, "P2 to run")
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"{key} 0", f"{key} 2"]
    from celery_partitioning.store.deadletters import DeadLetterStore
    from celery_partitioning.store.keys import RedisKeys

    (event,) = DeadLetterStore(client, RedisKeys(fa.NS)).history("entity")
    assert event["action"] == "discard" and event["key"] == key and event["at"]
    assert [m["id"] for m in event["messages"]] == dropped and len(event["raw"]) == 2
    # and the record is what `dead-letters history` shows, with the payloads that were dropped
    shown = cli(fa, "history", "--json", "--key", key)
    assert shown.returncode == 0, shown.stderr
    (record,) = json.loads(shown.stdout)
    assert record["action"] == "discard" and [m["id"] for m in record["messages"]] == dropped
    assert [json.loads(raw)["headers"]["id"] for raw in record["raw"]] == dropped
    table = cli(fa, "history", "--pool", "entity")
    assert table.returncode == 0 and "discard" in table.stdout and key in table.stdout
    assert "ValueError: poison message" in table.stdout
    assert "`dead-letters history` shows them" in out.stdout
    assert cli(fa, "history", "--key", "Order:nobody").stdout.strip() == \
        "no replays or discards recorded"
    again = cli(fa, "discard", "--key", key)
    assert again.returncode == 1 and "it was discarded at" in again.stderr


def test_discard_all_asks_then_drops_every_dead_letter_and_its_parked_messages(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    import os

    from celery_partitioning.store.deadletters import DeadLetterStore
    from celery_partitioning.store.keys import RedisKeys

    def discard_all(*args: str, answer: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [celery_bin(), "-A", "tests.apps.failures_app", "partitioning", "dead-letters",
             "discard", "--all", *args],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env_of(fa)}, cwd=ROOT, input=answer,
            capture_output=True, text=True, timeout=60, check=False)

    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    store = DeadLetterStore(client, RedisKeys(fa.NS))
    index, (p, q) = orders_on_one_partition(fa, 2)
    # Given two keys dead-lettered by a poison message, each with one message parked behind it
    for order in (p, q):
        client.set(f"{fa.NS}poison:{order}:0", "bad")
        fa.step.delay(order, 0)
        fa.step.delay(order, 1)
    start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: parked_len(client, fa, p) == 1 and parked_len(client, fa, q) == 1, 30,
             "P1 and Q1 parked")
    # When the operator answers no to the confirmation: nothing changes
    refused = discard_all(answer="n\n")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "discard 2 dead letter(s) and 2 message(s) parked" in refused.stderr
    assert len(store.find(["entity"])) == 2
    # And a pool without dead letters has nothing to discard
    other = discard_all("--pool", "dcb", "--yes")
    assert other.returncode == 0 and "no dead letters in pool(s) dcb" in other.stdout, other.stderr
    # And --all with --key is refused
    both = discard_all("--key", f"Order:{p}", "--yes")
    assert both.returncode == 2 and "either --key KEY or --all" in both.stderr
    # When the operator confirms
    done = discard_all(answer="y\n")
    assert done.returncode == 0, done.stderr
    assert "discarded 2 dead letter(s), 4 message(s) in all" in done.stdout
    # Then no dead letter and nothing parked is left, each discard is logged, the keys run again
    assert store.find(["entity", "dcb"]) == []
    assert parked_len(client, fa, p) == 0 and parked_len(client, fa, q) == 0
    assert sorted(e["key"] for e in store.history("entity")) == sorted([f"Order:{p}", f"Order:{q}"])
    for order in (p, q):
        fa.step.delay(order, 2)
    wait_for(lambda: all(client.lrange(f"{fa.NS}rec:Order:{o}", -1, -1) == ["end 2"]
                         for o in (p, q)), 30, "P2 and Q2 to run")
    assert discard_all("--yes").stdout.startswith("no dead letters")


def test_sigkill_while_parked_and_while_replaying_loses_nothing(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (p, q) = orders_on_one_partition(fa, 2)
    key = f"Order:{p}"
    # Given P parked behind a poison P0 with P1-P3, P2 slow
    client.set(f"{fa.NS}poison:{p}:0", "bad")
    for seq in range(4):
        fa.step.delay(p, seq)
    fa.step.delay(q, 0)
    first = start_partition_worker(processes, fa, "entity", index, tmp_path / "w1.log")
    wait_for(lambda: parked_len(client, fa, p) == 3 and client.llen(f"{fa.NS}rec:Order:{q}") == 2,
             30, "P parked, Q done")
    # When the worker is SIGKILLed while P is parked, and P4 and Q1 arrive meanwhile
    processes.signal(first, signal.SIGKILL)
    first.wait(timeout=10)
    fa.step.delay(p, 4)
    fa.step.delay(q, 1)
    second = start_partition_worker(processes, fa, "entity", index, tmp_path / "w2.log")
    wait_for(lambda: parked_len(client, fa, p) == 4 and client.llen(f"{fa.NS}rec:Order:{q}") == 4,
             30, "P4 parked, Q1 done")
    # And it is SIGKILLed again in the middle of the replayed P2
    client.delete(f"{fa.NS}poison:{p}:0")
    client.set(f"{fa.NS}slow:{p}:2", "1")
    assert cli(fa, "replay", "--key", key).returncode == 0
    wait_for(lambda: bool(client.get(f"{fa.NS}slow-running:{p}:2")), 30, "replayed P2 running")
    processes.signal(second, signal.SIGKILL)
    second.wait(timeout=10)
    client.delete(f"{fa.NS}slow:{p}:2")
    fa.step.delay(p, 5)
    start_partition_worker(processes, fa, "entity", index, tmp_path / "w3.log")
    # Then every message of P ran, in publish order, and nothing is parked any more
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 5"], 40, "P5 to run")
    records = {key: client.lrange(f"{fa.NS}rec:{key}", 0, -1),
               f"Order:{q}": client.lrange(f"{fa.NS}rec:Order:{q}", 0, -1)}
    report = check(records, {key: 6, f"Order:{q}": 2})
    assert report.ok and report.reruns == 2, report.summary()
    assert parked_len(client, fa, p) == 0 and client.hlen(f"{fa.NS}cp:dl:entity") == 0


def test_the_cli_needs_a_celery_app() -> None:
    from click.testing import CliRunner

    from celery_partitioning.cli.deadletters import dead_letters

    result = CliRunner().invoke(dead_letters, ["list"])
    assert result.exit_code == 2 and "no Celery app" in result.output


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("POSIX signals", allow_module_level=True)
