"""The `celery partitioning` commands, run as real programs: help, route, status, bad usage."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from celery_partitioning import partition_for
from celery_partitioning.store.keys import RedisKeys
from tests.apps.harness import Harness, keyed_events
from tests.support.procs import Processes


def _offline(tmp_path: Path) -> Harness:
    # route and --help need no broker; the URLs are never dialled.
    return Harness("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", "cpw-cli:", 4, tmp_path, Processes())


def test_help_explains_each_command(tmp_path: Path) -> None:
    h = _offline(tmp_path)
    top = h.cli("--help")
    assert top.returncode == 0
    for name in ("worker", "status", "route"):
        assert name in top.stdout
        sub = h.cli(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "Usage: celery partitioning " + name in sub.stdout
    assert "--partitions" in h.cli("worker", "--help").stdout
    assert "--json" in h.cli("status", "--help").stdout


def test_route_prints_pool_partition_and_queue(tmp_path: Path) -> None:
    h = _offline(tmp_path)
    result = h.cli("route", "Order:ord-123", "--json")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    index = partition_for("Order:ord-123", 4)
    assert row == {"key": "Order:ord-123", "pool": "p", "index": index, "partitions": 4,
                   "queue": f"cpw-cli:partition.p.{index}"}
    text = h.cli("route", "Order:ord-123", "--pool", "p")
    assert f"partition {index} (of 0-3)" in text.stdout and f"cpw-cli:partition.p.{index}" in text.stdout
    assert result.stderr == ""  # an entity key: no hint
    unknown = h.cli("route", "x", "--pool", "nope")
    assert unknown.returncode == 2 and "unknown partition pool 'nope'" in unknown.stderr


def test_route_of_a_bare_id_hints_at_the_entity_key_that_was_probably_meant(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.support.procs import ROOT, celery_bin

    # Given an app whose tasks key by create_entity_partition_key("Order")
    result = subprocess.run(
        [celery_bin(), "-A", "tests.apps.core_app", "partitioning", "route", "ord-123", "--json"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "CP_REDIS_URL": "redis://127.0.0.1:1/0",
             "CP_NS": "cpw-hint:"}, cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Then the raw string is routed as given (exit 0, JSON on stdout) with a hint on stderr
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["key"], r["pool"], r["index"]) for r in rows] == [
        ("ord-123", "entity", partition_for("ord-123", 2)), ("ord-123", "global", 0)]
    assert result.stderr.startswith("hint: 'ord-123' has no ':'")
    assert "did you mean Order:ord-123?" in result.stderr
    # and a key that is its own (global) or an app without entity tasks is no surprise
    h = _offline(tmp_path)
    assert h.cli("route", "global").stderr == ""
    generic = h.cli("route", "cust-9")
    assert generic.returncode == 0 and "e.g. Order:cust-9" in generic.stderr


def test_worker_rejects_a_bad_partition_selection_before_starting_anything(tmp_path: Path) -> None:
    h = _offline(tmp_path)
    beyond = h.cli("worker", "--partitions", "2-5")
    assert beyond.returncode == 2
    assert "has partitions 0-3, not 4, 5" in beyond.stderr
    garbled = h.cli("worker", "--partitions", "a-b")
    assert garbled.returncode == 2 and "is not an index or a range" in garbled.stderr
    dry = h.cli("worker", "--partitions", "1,3", "--processes", "2", "--dry-run")
    assert dry.returncode == 0
    lines = [line for line in dry.stdout.splitlines() if not line.startswith("#")]
    assert dry.stdout.splitlines()[0] == "# p.1: p.1"
    assert len(lines) == 2
    assert "-Q cpw-cli:partition.idle -P solo -c 1 --prefetch-multiplier 1" in lines[0]
    assert "-n p.1@%h" in lines[0] and "-n p.3@%h" in lines[1]
    one = h.cli("worker", "--partitions", "1,3", "--processes", "1", "--dry-run")
    assert one.stdout.splitlines()[0] == "# w0: p.1, p.3"
    assert "-n partitions0@%h" in one.stdout
    # without --partitions every process hosts the pool and holds its balanced share
    shared = h.cli("worker", "--processes", "2", "--dry-run")
    assert [line for line in shared.stdout.splitlines() if line.startswith("#")] == [
        "# w0: p.0, p.1, p.2, p.3", "# w1: p.0, p.1, p.2, p.3"]


def test_dry_run_masks_passwords_and_passes_root_options_on(tmp_path: Path) -> None:
    import subprocess

    from tests.support.procs import ROOT, celery_bin

    h = _offline(tmp_path)
    result = subprocess.run(
        [celery_bin(), "-b", "redis://:s3cret@127.0.0.1:1/0", "-A", "tests.apps.ordering_app",
         "partitioning", "worker", "--partitions", "0", "--dry-run", "--", "--max-tasks-per-child", "9"],
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), **h.env()},
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    # the broker reaches children through CELERY_BROKER_URL, never their command line
    assert " -b " not in result.stdout
    assert "-m celery -A tests.apps.ordering_app worker -Q cpw-cli:partition.idle" in result.stdout
    assert result.stdout.rstrip().endswith("--max-tasks-per-child 9")


@pytest.mark.integration
def test_status_json_reports_depths_of_a_known_backlog(redis_url: str, namespace: str,
                                                       tmp_path: Path) -> None:
    # Given a backlog published with no worker running
    url = redis_url
    h = Harness(url, url, namespace, 4, tmp_path, Processes())
    events, _counts = keyed_events(40, 150, ms=1)
    h.publish(events)
    expected = Counter(partition_for(key, 4) for key, _s, _m, _g in events)
    # and, for partition 0, a lease holder and one unacked message delivered 30 s ago
    client = h.redis
    queue0 = f"{namespace}partition.p.0"
    client.set(RedisKeys(namespace).lease(queue0), "tok|host-a|4242|p.0@host-a", px=60_000)
    payload = {"body": "", "headers": {}, "properties": {"delivery_info": {}}}
    client.hset(f"{namespace}unacked", "tag-1", json.dumps([payload, "celery", queue0]))
    client.zadd(f"{namespace}unacked_index", {"tag-1": time.time() - 30})
    # and, for partition 1, two keys waiting out a retry backoff
    due = time.time() + 60
    client.zadd(RedisKeys(namespace).backoff_schedule(f"{namespace}partition.p.1"),
                {json.dumps(["p", "k1"]): due, json.dumps(["p", "k2"]): due + 5})

    # When status --json runs
    result = h.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["index"]: r for r in json.loads(result.stdout)["partitions"]}

    # Then depths match the backlog per partition, and the rest is reported
    assert {i: rows[i]["depth"] for i in range(4)} == {i: expected.get(i, 0) for i in range(4)}
    assert rows[0]["unacked"] == 1 and rows[0]["oldest_age"] >= 30
    assert rows[0]["consumer"] == "p.0@host-a (pid 4242)"
    for i in range(1, 4):
        assert rows[i]["unacked"] == 0 and rows[i]["consumer"] is None
        if expected.get(i):
            assert 0 <= rows[i]["oldest_age"] < 60  # from the partition_published_at header
        assert rows[i]["parked_keys"] == 0
        assert rows[i]["queue"] == f"{namespace}partition.p.{i}"
    assert rows[1]["backoff_keys"] == 2 and abs(rows[1]["backoff_next_due"] - due) < 0.01
    assert [rows[i]["backoff_keys"] for i in (0, 2, 3)] == [0, 0, 0]

    # And status changed nothing; the table form says the same
    again = {r["index"]: r["depth"] for r in json.loads(h.cli("status", "--json").stdout)["partitions"]}
    assert again == {i: expected.get(i, 0) for i in range(4)}
    assert client.hlen(f"{namespace}unacked") == 1
    table = h.cli("status")
    assert table.returncode == 0
    assert "no consumer" in table.stdout and "p.0@host-a (pid 4242)" in table.stdout
    assert table.stdout.startswith(f"broker {url}")
    assert "DEPTH" in table.stdout and "2 (next in " in table.stdout


def test_worker_refuses_an_invalid_registry_before_starting_anything(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.support.procs import ROOT, celery_bin

    result = subprocess.run(
        [celery_bin(), "-A", "tests.apps.core_app", "partitioning", "worker"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "CP_INVALID": "1",
             "CP_REDIS_URL": "redis://127.0.0.1:1/0", "CP_NS": "cpw-invalid:"},
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to start partition workers" in result.stderr
    assert "core.broken_projection" in result.stderr and "core.wrong_pool" in result.stderr
    output = result.stdout + result.stderr
    assert output.count("core.wrong_pool") == 1, output  # the list is printed once
    assert "[supervisor]" not in result.stdout  # nothing was started


@pytest.mark.integration
@pytest.mark.rabbitmq
def test_status_json_reports_depths_and_consumers_on_rabbitmq(amqp_url: str, redis_url: str,
                                                               namespace: str, tmp_path: Path) -> None:
    from tests.apps.harness import delete_amqp_queues

    h = Harness(amqp_url, redis_url, namespace, 3, tmp_path, Processes())
    events, _counts = keyed_events(12, 40, ms=1)
    try:
        h.publish(events)
        expected = Counter(partition_for(key, 3) for key, _s, _m, _g in events)
        result = h.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        rows = {r["index"]: r for r in json.loads(result.stdout)["partitions"]}
        assert {i: rows[i]["depth"] for i in range(3)} == {i: expected.get(i, 0) for i in range(3)}
        assert all(rows[i]["consumer"] is None and rows[i]["unacked"] is None for i in range(3))
        assert ":guest@" not in h.cli("status").stdout  # the password is masked
    finally:
        delete_amqp_queues(amqp_url, [f"{namespace}partition.p.{i}" for i in range(3)])


def test_status_says_when_the_broker_cannot_be_reached_without_leaking_its_password(
        tmp_path: Path) -> None:
    h = Harness("redis://:s3cret@127.0.0.1:1/0", "redis://:s3cret@127.0.0.1:1/0", "cpw-cli:", 2,
                tmp_path, Processes())
    result = h.cli("status", "--json")
    assert result.returncode == 1
    assert "cannot read the partitions from redis://:**@127.0.0.1:1/0" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr


@pytest.mark.parametrize("command_line", [
    ["celery", "-A", "proj.app", "partitioning", "worker"],
    ["celery", "-Aproj.app", "partitioning", "worker"],
    ["celery", "--app", "proj.app", "partitioning", "worker"],
    ["celery", "--app=proj.app", "partitioning", "worker"],
])
def test_children_get_the_app_option_as_typed_even_when_celery_loaded_it_already(
        command_line: list[str]) -> None:
    # Given a root command whose app option Celery has already turned into the app (5.4)
    import click

    from celery_partitioning.cli import _root_options

    root = click.Context(click.Command("celery"))
    root.params = {"app": object(), "loader": None, "config": None, "workdir": None}
    child = click.Context(click.Command("worker"), parent=root)
    # Then the children are started with the text that was typed
    assert _root_options(child, command_line) == ["-A", "proj.app"]
