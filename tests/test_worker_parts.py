"""The parts of a partition worker one by one: selection, lease, recovery, ETA hold, supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_partitioning.config import PartitioningSettings
from celery_partitioning.errors import PartitionConfigError
from celery_partitioning.message import PartitionMessage
from celery_partitioning.store.broker import broker_redis, restore_unacked_to_head
from celery_partitioning.store.lease import Lease, parse_holder
from celery_partitioning.worker.eta import EtaHold
from celery_partitioning.worker.lifecycle import Partition
from celery_partitioning.worker.progress import Progress
from celery_partitioning.worker.stage import Verdict
from celery_partitioning.worker.supervisor import (
    parse_indexes,
    parse_partition_spec,
    select_partitions,
)
from tests.support.procs import ROOT, Processes, alive, wait_for

# -- selection ------------------------------------------------------------------------------

def test_partition_spec_parses_ranges_and_lists() -> None:
    assert parse_indexes("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_indexes(" 5 ") == [5]
    assert parse_indexes("2,1,2") == [1, 2]
    for bad in ("", "a", "3-1", "1-", "-1"):
        with pytest.raises(PartitionConfigError):
            parse_indexes(bad)


def test_selection_defaults_to_every_partition_of_every_pool() -> None:
    settings = PartitioningSettings(pools={"entity": 3, "global": 1}, queue_prefix="q")
    assert [(s.pool, s.index, s.queue) for s in select_partitions(settings)] == [
        ("entity", 0, "q.entity.0"), ("entity", 1, "q.entity.1"), ("entity", 2, "q.entity.2"),
        ("global", 0, "q.global.0")]
    assert [s.label for s in select_partitions(settings, ["entity"], "2")] == ["entity.2"]
    with pytest.raises(PartitionConfigError, match="pool 'entity' has partitions 0-2, not 5"):
        select_partitions(settings, ["entity"], "5")
    with pytest.raises(PartitionConfigError, match="unknown partition pool"):
        select_partitions(settings, ["nope"])


def test_partitions_name_a_pool_each_or_apply_to_the_one_selected_pool() -> None:
    settings = PartitioningSettings(pools={"entity": 6, "global": 1, "dcb": 2}, queue_prefix="q")
    # POOL:INDEXES, several at once; an index without a pool belongs to the pool before it
    assert [s.label for s in select_partitions(settings, [], "entity:0-2,5,global:0")] == [
        "entity.0", "entity.1", "entity.2", "entity.5", "global.0"]
    assert parse_partition_spec("entity:1, dcb:0-1") == {"entity": [1], "dcb": [0, 1]}
    # plain indexes: fine when one pool is selected (by --pool, or the default selection)
    assert [s.label for s in select_partitions(settings, [], "0-5", default_pools=["entity"])] \
        == [f"entity.{i}" for i in range(6)]
    # else one clear line saying how to write it
    with pytest.raises(PartitionConfigError, match=r"--partitions 0-5 names no pool but 3 pools "
                       r"are selected \(entity, global, dcb\): write POOL:INDEXES, e.g. "
                       r"entity:0-5,global:0, or choose one pool with --pool"):
        select_partitions(settings, [], "0-5")
    for spec, says in [("0,entity:1", "the indexes before entity: name no pool"),
                       (":1", "names no pool"), ("entity:x", "'x' is not an index"),
                       ("nope:0", "unknown partition pool 'nope'"),
                       ("global:0-1", "pool 'global' has partitions 0-0, not 1")]:
        with pytest.raises(PartitionConfigError, match=says):
            select_partitions(settings, [], spec)
    with pytest.raises(PartitionConfigError, match=r"names pool\(s\) entity but --pool selects dcb"):
        select_partitions(settings, ["dcb"], "entity:0")


# -- ETA hold -------------------------------------------------------------------------------

def _msg(headers: dict[str, Any]) -> PartitionMessage:
    return PartitionMessage(SimpleNamespace(headers=headers, body=b"", properties={}, delivery_info={}),
                       "t")


# -- life cycle -------------------------------------------------------------------------------
class _IdleThread:
    """A partition thread that has ended: what a unit finds after a stop."""

    fetch_name = ""

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return False


def test_a_stopping_process_starts_no_partition_even_a_start_that_waited_for_its_stop() -> None:
    # Given a partition unit of a running process, started and stopped once
    process_stopping = threading.Event()
    runtime: Any = SimpleNamespace(worker=SimpleNamespace(stopping=process_stopping.is_set),
                                   stop_event=threading.Event(), label="p.0")
    made: list[object] = []
    unit = Partition(runtime, thread=lambda rt: made.append(rt) or _IdleThread())  # type: ignore[arg-type]
    assert unit.start() is not None and len(made) == 1
    assert unit.stop(timeout=1)
    # When its process begins a warm stop, and a start arrives afterwards (the balancer's
    # hand-over thread had waited for the stop to let go of the unit)
    process_stopping.set()
    # Then nothing starts: the lease the stop handed over stays with the others
    assert unit.start() is None
    assert len(made) == 1
    # and a unit of a process still running starts again as often as asked
    process_stopping.clear()
    assert unit.start() is not None and len(made) == 2


def test_an_eta_message_holds_the_partition_until_its_time_then_runs_without_eta() -> None:
    stopping = {"now": False}
    runtime = SimpleNamespace(label="p.0", stopping=lambda: stopping["now"], progress=Progress())
    hold = EtaHold(runtime)  # type: ignore[arg-type]
    eta = datetime.now(UTC) + timedelta(seconds=0.4)
    msg = _msg({"id": "x", "eta": eta.isoformat()})
    started = time.monotonic()
    assert hold.before(msg) is Verdict.RUN
    assert time.monotonic() - started >= 0.35
    assert msg.headers["eta"] is None  # Celery must not schedule it aside
    past = _msg({"id": "y", "eta": "2000-01-01T00:00:00+00:00"})
    assert hold.before(past) is Verdict.RUN and past.headers["eta"] is None
    plain = _msg({"id": "z"})
    assert hold.before(plain) is Verdict.RUN and "eta" not in plain.headers
    # a stop during the wait sends the message back to the head, its ETA kept
    stopping["now"] = True
    later = _msg({"id": "w", "eta": (datetime.now(UTC) + timedelta(seconds=30)).isoformat()})
    assert hold.before(later) is Verdict.BACK and later.headers["eta"] is not None


# -- lease (real Redis) -----------------------------------------------------------------------

@pytest.fixture
def lease_key(redis_url: str) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(redis_url)
    key = f"cptest-lease-{uuid.uuid4().hex[:8]}"
    yield client, key
    client.delete(key)


@pytest.mark.integration
def test_lease_is_exclusive_and_a_known_dead_token_can_be_taken_over(
        lease_key: tuple[redis.Redis, str]) -> None:
    client, key = lease_key
    a = Lease(client, key, 5, node="a@h", token="tokA")
    b = Lease(client, key, 5, node="b@h", token="tokB")
    assert a.try_acquire()
    assert not b.try_acquire()
    holder = parse_holder(client.get(key))
    assert holder is not None and holder.token == "tokA" and holder.node == "a@h"
    # a successor told by the supervisor that tokA died takes over at once
    c = Lease(client, key, 5, node="c@h", token="tokC", takeover="tokA")
    assert c.try_acquire()
    assert not a.try_acquire() or False  # tokA is no longer the holder...
    assert parse_holder(client.get(key)).token == "tokC"  # type: ignore[union-attr]
    # ...and a takeover token that does not match (a prefix of it, say) takes nothing
    d = Lease(client, key, 5, token="tok", takeover="tok")
    assert not d.try_acquire()
    a.release()  # not the holder: leaves the lease alone
    assert client.get(key) is not None
    c.release()
    assert client.get(key) is None


@pytest.mark.integration
def test_standby_acquires_within_the_ttl_after_the_holder_stops_renewing(
        lease_key: tuple[redis.Redis, str]) -> None:
    client, key = lease_key
    holder = Lease(client, key, 1.0, token="h")
    assert holder.try_acquire()  # and never renews: as if SIGKILLed
    standby = Lease(client, key, 1.0, token="s")
    # While the holder's lease lives, the standby cannot take it...
    assert not standby.try_acquire()
    # ...and it does as soon as the lease runs out, which it polls for
    seen_alive: list[bool] = []

    def give_up() -> bool:
        seen_alive.append(client.exists(key) == 1)
        return len(seen_alive) > 200  # 200 polls of at most 0.1 s: the TTL is 1 s
    assert standby.acquire(give_up)
    assert parse_holder(client.get(key)).token == "s"  # type: ignore[union-attr]
    assert seen_alive[0] and not all(seen_alive)  # it waited while held, not a fixed time
    standby.release()


@pytest.mark.integration
def test_a_holder_that_loses_its_lease_fences_itself(lease_key: tuple[redis.Redis, str]) -> None:
    client, key = lease_key
    reasons: list[str] = []
    lease = Lease(client, key, 1.0, token="mine", fence=reasons.append)
    beats: list[int] = []
    lease.on_beat.append(lambda: beats.append(client.pttl(key)))
    assert lease.try_acquire()
    lease.start_heartbeat()
    wait_for(lambda: bool(beats), 5, "a renewal")
    assert parse_holder(client.get(key)).token == "mine"  # type: ignore[union-attr]
    assert beats[0] > 0  # on_beat runs only after a successful renewal
    client.set(key, "thief|h|1|x", px=5000)  # someone else holds it now
    wait_for(lambda: bool(reasons), 3, "the fence")
    assert "lost the lease" in reasons[0]
    lease.release()
    assert client.get(key) == b"thief|h|1|x"


# -- crash recovery (real Redis, kombu's own unacked bookkeeping) ----------------------------

@pytest.mark.integration
def test_recovery_puts_only_its_queues_unacked_messages_back_at_the_head_in_order(
        redis_url: str, namespace: str) -> None:
    from kombu import Connection

    from tests.apps.ordering_app import make_app

    url = redis_url
    app = make_app(url, url, namespace, 2)
    qa, qb = f"{namespace}partition.p.0", f"{namespace}partition.p.1"
    # Given 5 messages on A and 2 on B; a consumer takes A's first 3 and B's 2 and dies
    conn = Connection(url, transport_options={"global_keyprefix": namespace})
    channel = conn.channel()
    for name in (qa, qb):
        channel.queue_declare(queue=name)
    producer = conn.Producer(channel)
    for i in range(5):
        producer.publish({"n": i}, routing_key=qa, exchange="")
    for i in range(2):
        producer.publish({"n": 100 + i}, routing_key=qb, exchange="")
    held = [channel.basic_get(qa, no_ack=False) for _ in range(3)]
    held += [channel.basic_get(qb, no_ack=False) for _ in range(2)]
    assert all(m is not None for m in held)
    channel.qos.restore_at_shutdown = False  # a SIGKILL restores nothing
    client = redis.Redis.from_url(url)
    assert client.hlen(f"{namespace}unacked") == 5

    # When A's new holder recovers
    broker = broker_redis(app)
    assert broker is not None
    try:
        assert restore_unacked_to_head(broker, qa) == 3
        assert restore_unacked_to_head(broker, qa) == 0  # idempotent
    finally:
        broker.close()

    # Then A replays 0..4 in order; B's held messages are untouched
    fresh = Connection(url, transport_options={"global_keyprefix": namespace})
    ch = fresh.channel()
    order = []
    while (m := ch.basic_get(qa, no_ack=True)) is not None:
        order.append(json.loads(m.body)["n"])
    assert order == [0, 1, 2, 3, 4]
    assert client.hlen(f"{namespace}unacked") == 2
    assert {json.loads(v)[2] for v in client.hvals(f"{namespace}unacked")} == {qb}
    fresh.release()
    conn.release()


@pytest.mark.integration
def test_recovery_also_returns_messages_caught_between_fetch_and_unacked_once_each(
        redis_url: str, namespace: str) -> None:
    from celery_partitioning.store.keys import RedisKeys
    from tests.apps.ordering_app import make_app

    url = redis_url
    app = make_app(url, url, namespace, 1)
    queue = f"{namespace}partition.p.0"
    in_transit = RedisKeys(namespace).in_transit(queue)
    client = redis.Redis.from_url(url)

    def payload(n: int) -> dict[str, Any]:
        return {"body": str(n), "headers": {}, "properties": {"delivery_tag": f"tag-{n}",
                                                            "delivery_info": {}}}

    # Given: message 0 registered as unacked (and, killed before the LREM, still in transit),
    # message 1 moved to in-transit only (killed before kombu recorded it), 2 and 3 queued
    client.hset(f"{namespace}unacked", "tag-0", json.dumps([payload(0), "celery", queue]))
    client.zadd(f"{namespace}unacked_index", {"tag-0": time.time() - 5})
    client.lpush(in_transit, json.dumps(payload(0)))
    client.lpush(in_transit, json.dumps(payload(1)))
    client.lpush(f"{namespace}{queue}", json.dumps(payload(2)))
    client.lpush(f"{namespace}{queue}", json.dumps(payload(3)))

    broker = broker_redis(app)
    assert broker is not None
    try:
        assert restore_unacked_to_head(broker, queue, in_transit) == 2
    finally:
        broker.close()

    # Then the queue replays 0, 1, 2, 3 (BRPOP order), each once; nothing is left aside
    order = []
    while (raw := client.rpop(f"{namespace}{queue}")) is not None:
        order.append(json.loads(raw)["body"])
    assert order == ["0", "1", "2", "3"]
    assert client.llen(in_transit) == 0 and client.hlen(f"{namespace}unacked") == 0


# -- supervisor ------------------------------------------------------------------------------

_CHILD = """
import os, signal, sys, time
print("token", os.environ["CELERY_PARTITIONING_LEASE_TOKEN"],
      "takeover", os.environ.get("CELERY_PARTITIONING_LEASE_TAKEOVER", "-"),
      "partition", os.environ["CELERY_PARTITIONING_PARTITIONS"], flush=True)
if os.environ["MODE"] == "crash" and not os.environ.get("CELERY_PARTITIONING_LEASE_TAKEOVER"):
    sys.exit(3)
if os.environ["MODE"] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("running", flush=True)
while True:
    time.sleep(0.1)
"""

def _supervised(child: str) -> str:
    """A script that runs a Supervisor of one partition whose (forked) child runs ``child``'s
    code as its main module."""
    return f"""
import sys
from celery_partitioning.worker.supervisor import ChildSpec, PartitionSpec, Supervisor
def child(spec):
    exec(compile({child!r}, "<child>", "exec"), {{"__name__": "__main__"}})
    return 0
specs = [ChildSpec((PartitionSpec("p", 0, "q.p.0"),))]
sys.exit(Supervisor(specs, child, stop_timeout=1.0).run())
"""


def _supervise(processes: Processes, tmp_path: Path, mode: str) -> tuple[Any, Path]:
    log = tmp_path / f"{mode}.log"
    proc = processes.start([sys.executable, "-c", _supervised(_CHILD)], env={"MODE": mode}, log=log)
    return proc, log


def test_supervisor_restarts_a_dead_child_handing_over_its_lease_token(
        processes: Processes, tmp_path: Path) -> None:
    proc, log = _supervise(processes, tmp_path, "crash")
    wait_for(lambda: "[p.0] running" in log.read_text(), 20, "the restarted child")
    text = log.read_text()
    first, second = [line.split() for line in text.splitlines() if line.startswith("[p.0] token")]
    assert first[4] == "-" and second[4] == first[2]  # takeover = the dead child's token
    assert second[6] == "p:0"
    assert "[supervisor] p.0 (pid" in text and "exited with code 3" in text and "restarting in 1s" in text
    processes.signal(proc, signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "stopped cleanly" in log.read_text()


def test_supervisor_exit_code_says_a_child_had_to_be_killed(processes: Processes,
                                                            tmp_path: Path) -> None:
    proc, log = _supervise(processes, tmp_path, "stubborn")
    wait_for(lambda: "[p.0] running" in log.read_text(), 20, "the child")
    proc.send_signal(signal.SIGTERM)  # the supervisor only: the child ignores SIGTERM anyway
    assert proc.wait(timeout=20) == 1
    text = log.read_text()
    assert "killing p.0" in text and "not every worker stopped cleanly" in text


_FLOODING_CHILD = """
import os, sys, threading, time
from celery_partitioning.worker.orphan import start_supervisor_watch
gone = threading.Event()
start_supervisor_watch("p.0", gone.set)
def say(line):  # one write per line: the watch thread's own line cannot land inside it
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
say(f"running pid {os.getpid()}")
n = 0
while not gone.is_set():
    say(f"line {n} {'x' * 200}")  # fills a 64 KiB pipe in well under a second
    n += 1
    time.sleep(0.001)
say(f"stopped warmly after line {n - 1}")
"""


def test_a_child_outlives_its_supervisor_without_a_broken_pipe(processes: Processes,
                                                               tmp_path: Path) -> None:
    # Given a supervised child printing as fast as it can
    log = tmp_path / "orphan.log"
    sup = processes.start([sys.executable, "-c", _supervised(_FLOODING_CHILD)], log=log)
    wait_for(lambda: "[p.0] line 100 " in log.read_text(), 20, "the child's output")
    child = int(next(line.split()[-1] for line in log.read_text().splitlines()
                     if line.startswith("[p.0] running pid")))

    # When the supervisor alone is SIGKILLed: nobody reads the child's pipe any more
    sup.kill()
    sup.wait(timeout=10)

    # Then the child never fails a write: it notices, keeps printing to the same log with
    # the same prefix, and ends as it chose to
    wait_for(lambda: "[p.0] stopped warmly after line" in log.read_text(), 10, "the orphan's last line")
    wait_for(lambda: not alive(child), 10, "the orphan to exit")
    text = log.read_text()
    assert f"[p.0] p.0 supervisor (pid {sup.pid}) is gone: warm shutdown" in text
    for sign in ("BrokenPipeError", "Broken pipe", "Traceback"):
        assert sign not in text, text[-2000:]
    last = int(text.split("[p.0] stopped warmly after line ")[1].split()[0])
    printed = {int(line.split()[2]) for line in text.splitlines() if line.startswith("[p.0] line ")}
    assert {last - 1, last} <= printed  # its last lines, printed with no supervisor, arrived


def test_a_supervisor_whose_output_is_gone_keeps_supervising_and_stops_cleanly(
        processes: Processes) -> None:
    # Given a supervisor printing into a pipe, and its child running
    sup = subprocess.Popen([sys.executable, "-c", _supervised(_CHILD)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "MODE": "ok"})
    processes.started.append(sup)
    assert sup.stdout is not None
    seen = b""
    while b"[p.0] running" not in seen:
        chunk = sup.stdout.readline()
        assert chunk, seen.decode()
        seen += chunk

    # When the pipe's reader goes away (a closed terminal, a dead log shipper) and the
    # supervisor is then told to stop, printing as it stops
    sup.stdout.close()
    sup.send_signal(signal.SIGTERM)

    # Then it still stops its child warmly and exits 0, instead of dying of a broken pipe
    assert sup.wait(timeout=20) == 0
