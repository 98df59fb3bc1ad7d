"""Security: keys are data, never names or code; the CLI never prints passwords; read commands read.

* A partition key travels in the message headers and is never used unescaped in a Redis key
  name (only its digest is) nor in a queue name, and never evaluated.
* The CLI masks the password of broker and store URLs in everything it prints, errors included,
  and does not put it on child command lines (visible to every user in ``ps``).
* ``status``, ``route``, ``dead-letters list`` and ``worker --dry-run`` change no Redis state;
  ``dead-letters discard`` does, because it is asked to.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_partitioning import PartitionConfigError
from celery_partitioning.config import read_settings
from celery_partitioning.store.deadletters import DeadLetter, DeadLetterStore, now_iso
from celery_partitioning.store.keys import RedisKeys, key_digest
from tests.apps.reliability_app import FAIL_TASK, RECORD_TASK
from tests.reliability.adversarial import ADVERSARIAL_KEYS
from tests.reliability.conftest import PrivateRedis, Workload
from tests.support.procs import ROOT, Processes, celery_bin, wait_for

PASSWORD = "S3cr3t-Pa55w0rd"
#: A Redis key name we accept: printable ASCII, no spaces.
SAFE_NAME = re.compile(r"\A[\x21-\x7e]+\Z")
#: Adversarial keys long and distinctive enough that finding one inside a name means it leaked.
TELLING_KEYS = [k for k in ADVERSARIAL_KEYS if len(k) >= 3 and k not in ("celery",)]


# --- key names (no broker) ------------------------------------------------------------------


def _name_arguments(method: Callable[..., str], key: str) -> dict[str, Any]:
    """Arguments for a RedisKeys method: user text where a key or task id goes, safe text elsewhere."""
    args: dict[str, Any] = {}
    for name in list(inspect.signature(method).parameters):
        args[name] = key if ("key" in name or name in ("task_id", "id")) else "p"
    return args


@pytest.mark.parametrize("key", ADVERSARIAL_KEYS, ids=range(len(ADVERSARIAL_KEYS)))
def test_redis_key_names_carry_digests_never_key_text(key: str) -> None:
    keys = RedisKeys("ns:")
    checked = 0
    for attr in dir(keys):
        method = getattr(keys, attr)
        if attr.startswith("_") or not callable(method):
            continue
        params = inspect.signature(method).parameters
        if not any("key" in p or p in ("task_id", "id") for p in params):
            continue  # takes only validated names (pool, queue)
        name = method(**_name_arguments(method, key))
        checked += 1
        assert SAFE_NAME.match(name), f"RedisKeys.{attr} built an unsafe name {name[:80]!r}"
        assert key not in name or key not in TELLING_KEYS, f"RedisKeys.{attr} embeds the key text"
        assert name.startswith("ns:cp:") and len(name) < 200
    assert checked >= 4, "RedisKeys has no method taking a key: this test checked nothing"


def test_key_digest_is_fixed_size_and_distinct() -> None:
    digests = {key_digest(k) for k in ADVERSARIAL_KEYS}
    assert len(digests) == len(set(ADVERSARIAL_KEYS))
    assert all(re.fullmatch(r"[0-9a-f]{32}", d) for d in digests)


@pytest.mark.parametrize("conf", [
    {"partitioning_redis_url": f"amqp://user:{PASSWORD}@broker.example//"},
    {"partitioning_redis_url": f"http://:{PASSWORD}@store.example:6379/0"},
])
def test_setting_errors_do_not_echo_passwords(conf: dict[str, Any]) -> None:
    with pytest.raises(PartitionConfigError) as caught:
        read_settings(conf)
    assert PASSWORD not in str(caught.value)
    assert "partitioning_redis_url" in str(caught.value)  # still says what is wrong


# --- the CLI (real processes) -----------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str, root: tuple[str, ...] = (), timeout: float = 60,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [celery_bin(), "-A", "tests.apps.reliability_app", *root, "partitioning", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout)


@pytest.fixture
def locked_redis(processes: Processes, tmp_path: Path) -> PrivateRedis:
    """A private redis-server that requires a password."""
    directory = tmp_path / "locked"
    directory.mkdir()
    server = PrivateRedis(processes, directory, "--requirepass", PASSWORD)
    server.start()
    return server


@pytest.mark.integration
def test_the_cli_never_prints_a_password(locked_redis: PrivateRedis, records_url: str, rel_ns: str) -> None:
    broker = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    other_store = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/1"
    env = {"CPR_BROKER": broker, "CPR_RECORDS": records_url, "CPR_NS": rel_ns, "CPR_PARTITIONS": "2"}
    # A dead letter in the other store, so that replay gets as far as comparing the URLs.
    DeadLetterStore(redis.Redis.from_url(other_store), RedisKeys(rel_ns)).dead_letter(
        DeadLetter(pool="p", key="Order:1", task=RECORD_TASK, id="t-1", args="[]", kwargs="{}",
                   error="RuntimeError('x')", traceback="...", attempts=1, failed_at=now_iso(),
                   raw=json.dumps({"body": "", "headers": {"id": "t-1"}, "properties": {}})),
        f"{rel_ns}partition.p.0")
    runs = {
        "status": run_cli(env, "status"),
        "status --json": run_cli(env, "status", "--json"),
        "route": run_cli(env, "route", "Order:1"),
        "worker --dry-run": run_cli(env, "worker", "--dry-run"),
        "-b ... worker --dry-run": run_cli({**env, "CPR_BROKER": ""}, "worker", "--dry-run",
                                           root=("-b", broker)),
        "dead-letters list": run_cli(env, "dead-letters", "list"),
        "dead-letters list --json": run_cli(env, "dead-letters", "list", "--json"),
        # Replay with the store on another Redis than the broker (a path that compares URLs).
        "dead-letters replay (store elsewhere)": run_cli({**env, "CPR_STORE": other_store},
                                                         "dead-letters", "replay", "--key", "Order:1"),
        # A broker that does not answer.
        "status (broker down)": run_cli({**env, "CPR_BROKER": f"redis://:{PASSWORD}@127.0.0.1:1/0"},
                                        "status", timeout=90),
    }
    leaks = {name: (r.stdout + r.stderr) for name, r in runs.items() if PASSWORD in r.stdout + r.stderr}
    assert runs["status"].returncode == 0, runs["status"].stderr[-2000:]  # the password worked
    assert not leaks, "passwords printed by: " + "; ".join(
        f"{name}: {next(line for line in text.splitlines() if PASSWORD in line)[:300]}"
        for name, text in leaks.items())


def snapshot(client: redis.Redis, ns: str) -> dict[bytes, tuple[bytes, bytes | None, bool]]:
    """Every key of a namespace: (type, serialized value, has a TTL)."""
    state = {}
    for name in client.scan_iter(match=f"*{ns}*", count=1000):
        state[name] = (client.type(name), client.dump(name), client.ttl(name) >= 0)
    return state


@pytest.mark.integration
def test_read_commands_change_nothing_and_discard_does(workload_factory: Callable[..., Workload],
                                                       records_url: str, rel_ns: str) -> None:
    w = workload_factory(2)
    w.publish([("Order:queued", i) for i in range(3)] + [("Order:other", 0)])
    store = DeadLetterStore(w.redis, RedisKeys(rel_ns))
    key = "Order:line1\nline2 *"
    queue = f"{rel_ns}partition.p.0"
    store.dead_letter(DeadLetter(pool="p", key=key, task=RECORD_TASK, id="t-1", args="[]", kwargs="{}",
                                 error="RuntimeError('x')", traceback="...", attempts=1,
                                 failed_at=now_iso(), queue=queue, raw=None), queue)
    client = redis.Redis.from_url(records_url)
    before = snapshot(client, rel_ns)
    assert len(before) >= 3, before.keys()  # queues, dead letter: there is state to change
    for args in (("status",), ("status", "--json"), ("route", key), ("worker", "--dry-run"),
                 ("dead-letters", "list"), ("dead-letters", "list", "--json"),
                 ("dead-letters", "list", "--key", key)):
        result = run_cli(w.env(), *args)
        assert result.returncode == 0, f"{args}: {result.stderr[-1500:]}"
        assert snapshot(client, rel_ns) == before, f"`partitioning {' '.join(args)}` changed Redis state"
    listed = json.loads(run_cli(w.env(), "dead-letters", "list", "--json").stdout)
    assert [entry["key"] for entry in listed] == [key]  # the key is data, shown as it is
    # Control: a command that is asked to change state does change it (the snapshot can tell).
    result = run_cli(w.env(), "dead-letters", "discard", "--key", key, "--pool", "p")
    assert result.returncode == 0, result.stderr[-1500:]
    assert snapshot(client, rel_ns) != before


# --- adversarial keys end to end (real workers) -------------------------------------------


@pytest.mark.integration
def test_adversarial_keys_run_in_order_and_leave_only_digests(workload_factory: Callable[..., Workload],
                                                              records_url: str, rel_ns: str,
                                                              tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    evil = [*ADVERSARIAL_KEYS, f"__import__('pathlib').Path({str(canary)!r}).touch()",
            f"{{__import__('pathlib').Path({str(canary)!r}).touch()}}"]
    w = workload_factory(2)
    events = [(key, seq) for seq in range(2) for key in evil]
    counts = dict.fromkeys(evil, 2)
    w.start_workers()
    w.publish(events)
    failing = ["Order:fail\n*", "fail:" + "y" * 100_000]
    for key in failing:
        w.app.tasks[FAIL_TASK].apply_async((key,))
    w.wait_done(len(events), timeout=60)
    wait_for(lambda: w.redis.scard(f"{rel_ns}failed") >= len(failing), 30, "the failing tasks to run")

    report = w.report(counts)
    assert report.ok, report.summary()
    assert not canary.exists(), "a partition key was evaluated"
    client = redis.Redis.from_url(records_url)
    wait_for(lambda: len(json.loads(run_cli(w.env(), "dead-letters", "list", "--json").stdout or "[]"))
             >= len(failing), 30, "dead letters for the failing keys")
    listed = json.loads(run_cli(w.env(), "dead-letters", "list", "--json").stdout)
    assert sorted(entry["key"] for entry in listed) == sorted(failing)
    names = [n.decode("utf-8", "replace") for n in client.scan_iter(match=f"*{rel_ns}*", count=1000)]
    assert any(":cp:" in n for n in names), names  # the library did store things here
    unsafe = [n[:120] for n in names if not SAFE_NAME.match(n)]
    leaked = [(n[:120], k[:40]) for n in names for k in [*TELLING_KEYS, *failing] if k in n]
    assert not unsafe, f"unsafe Redis key names: {unsafe}"
    assert not leaked, f"key text inside Redis key names: {leaked}"


@pytest.mark.integration
def test_workers_started_with_b_use_that_broker_and_hide_its_password(
        locked_redis: PrivateRedis, workload_factory: Callable[..., Workload], processes: Processes,
        tmp_path: Path) -> None:
    broker = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    w = workload_factory(2, broker=broker)
    env = {**w.env(), "CPR_BROKER": ""}  # the app's own broker is another Redis: -b must win
    supervisor = processes.start([celery_bin(), "-A", "tests.apps.reliability_app", "-b", broker,
                                  "partitioning", "worker", "-l", "warning"], env=env,
                                 log=tmp_path / "workers.log")
    w.publish([("Order:b", i) for i in range(5)])
    w.wait_done(5, timeout=60)
    assert w.report({"Order:b": 5}).ok
    import psutil

    # The children are forked: they show the supervisor's own command line, nothing added
    # (an exec'd `celery worker` would have needed the broker URL passed on somehow).
    own = psutil.Process(supervisor.pid).cmdline()
    lines = [c.cmdline() for c in psutil.Process(supervisor.pid).children(recursive=True)]
    assert len(lines) == 2 and all(line == own for line in lines), (own, lines)
    log = (tmp_path / "workers.log").read_text(errors="replace")
    assert "no Redis store configured" not in log, "-b did not reach the partitioning store (leases, dead letters)"
