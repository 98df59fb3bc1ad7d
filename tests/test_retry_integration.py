"""Retries with real partition workers on a real Redis.

A partitioned task that retries keeps its place in its key: a short backoff (below
``partitioning_retry_hold_below``) is waited out in place by the partition; a longer one sets
the key aside, so other keys of the partition go on, and the message runs again before
anything of its key published after it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import ModuleType

import pytest
import redis

from celery_partitioning.message import message_summary
from celery_partitioning.store.keys import RedisKeys
from tests.support.failures import start_partition_worker
from tests.support.ordering import check
from tests.support.procs import Processes, wait_for

pytestmark = pytest.mark.integration


def same_partition_orders(fa: ModuleType, count: int, prefix: str = "o") -> tuple[int, list[str]]:
    """``count`` order ids whose keys share one entity partition (and that partition)."""
    chosen: list[str] = []
    index = None
    for i in range(1000):
        order = f"{prefix}{i}"
        where = fa.cp.explain_route(fa.app, "fail.flaky", order, 0).index
        if index is None:
            index = where
        if where == index:
            chosen.append(order)
        if len(chosen) == count:
            return int(index), chosen
    raise AssertionError("no keys found")


def left_behind(client: redis.Redis, ns: str) -> list[str]:
    """Retry and parking state left in Redis (none once every key is done)."""
    return [k for pattern in ("attempts", "backoff*", "parked*", "replaying", "deferred")
            for k in client.scan_iter(match=f"{ns}cp:{pattern}:*")]


def test_a_short_retry_runs_in_place_before_later_messages_of_the_partition(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, b) = same_partition_orders(fa, 2)
    # Given A0 fails twice (self.retry(countdown=0.05): below the 0.1 s threshold), then
    # succeeds; B shares A's partition
    fa.flaky.delay(a, 0, 2, 0.05)
    fa.flaky.delay(b, 0)
    fa.flaky.delay(a, 1)
    fa.flaky.delay(b, 1)
    fa.flaky.delay(a, 2)
    # When one real partition worker runs them
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 7, 40, "7 runs")
    processes.signal(proc, signal.SIGTERM)
    proc.wait(timeout=60)  # a warm stop: the last task records its end before the worker exits
    # Then A0 ran three times in a row, then the rest in publish order
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"Order:{a} 0 try0", f"Order:{a} 0 try1", f"Order:{a} 0 try2",
        f"Order:{b} 0 try0", f"Order:{a} 1 try0", f"Order:{b} 1 try0", f"Order:{a} 2 try0",
    ]
    records = {f"Order:{o}": client.lrange(f"{fa.NS}rec:Order:{o}", 0, -1) for o in (a, b)}
    report = check(records, {f"Order:{a}": 3, f"Order:{b}": 2})
    assert report.ok and report.reruns == 2, report.summary()
    assert not left_behind(client, fa.NS)


def test_a_key_in_retry_backoff_waits_alone_while_other_keys_of_the_partition_go_on(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, *others) = same_partition_orders(fa, 11)
    # Given A0 fails once with a 3 s countdown, then A1, A2 and 40 events of 10 other keys of
    # its partition
    fa.flaky.delay(a, 0, 1, 3.0)
    for seq in range(4):
        for order in others:
            fa.flaky.delay(order, seq)
        if seq < 2:
            fa.flaky.delay(a, seq + 1)
    # When one real partition worker runs them
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 44, 60, "44 runs")
    processes.signal(proc, signal.SIGTERM)
    proc.wait(timeout=60)
    ran = client.lrange(f"{fa.NS}ran", 0, -1)
    # Then every other key finished during A0's backoff, before its second attempt
    retry = ran.index(f"Order:{a} 0 try1")
    assert ran[0] == f"Order:{a} 0 try0"
    assert sorted(ran[1:retry]) == sorted(f"Order:{o} {s} try0" for o in others for s in range(4))
    # And A ran 0 (two attempts), 1, 2 in order, each message's steps whole
    assert [r for r in ran if r.startswith(f"Order:{a} ")] == [
        f"Order:{a} 0 try0", f"Order:{a} 0 try1", f"Order:{a} 1 try0", f"Order:{a} 2 try0"]
    keys = [f"Order:{o}" for o in (a, *others)]
    records = {k: client.lrange(f"{fa.NS}rec:{k}", 0, -1) for k in keys}
    report = check(records, {k: 3 if k == f"Order:{a}" else 4 for k in keys})
    assert report.ok and report.reruns == 1, report.summary()
    assert not left_behind(client, fa.NS)


def test_autoretry_exhausted_becomes_a_dead_letter_with_its_attempts(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, b) = same_partition_orders(fa, 2)
    # Given A0 always hits a transient fault (autoretry_for=ConnectionError, max_retries=2)
    client.set(f"{fa.NS}poison:{a}:0", "transient")
    fa.step.delay(a, 0)
    fa.step.delay(a, 1)
    fa.step.delay(b, 0)
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 4, 40, "4 runs")
    parked = RedisKeys(fa.NS).parked("entity", f"Order:{a}")
    wait_for(lambda: client.hlen(f"{fa.NS}cp:dl:entity") == 1 and client.llen(parked) == 1, 10,
             "the dead letter, A1 parked behind it")
    processes.signal(proc, signal.SIGTERM)
    proc.wait(timeout=60)  # a warm stop: the last task records its end before the worker exits
    # Then A0 ran 3 times (B0 during its backoffs), A1 did not run: it is parked behind A0
    ran = client.lrange(f"{fa.NS}ran", 0, -1)
    assert [r for r in ran if r.startswith(f"Order:{a} ")] == [f"Order:{a} 0"] * 3
    assert ran.count(f"Order:{b} 0") == 1
    assert [message_summary(m).args for m in client.lrange(parked, 0, -1)] == [repr((a, 1))]
    (record,) = [json.loads(v) for v in client.hvals(f"{fa.NS}cp:dl:entity")]
    assert record["key"] == f"Order:{a}" and record["task"] == "fail.step"
    assert record["reason"] == "MAX_RETRIES_EXCEEDED" and record["attempts"] == 3
    assert record["error"].startswith("ConnectionError: transient fault")
    assert "Traceback" in record["traceback"] and record["partition"] == index
    assert record["raw"] and json.loads(record["raw"])["headers"]["id"] == record["id"]


def test_a_standby_taking_over_during_a_backoff_resumes_the_same_attempt_and_arguments(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, b) = same_partition_orders(fa, 2)
    # Given a worker consuming A's partition and a second one waiting as its standby
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker1.log")
    wait_for(lambda: "consuming" in (tmp_path / "worker1.log").read_text(errors="replace"), 60,
             "the first worker to consume")
    proc2 = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker2.log")
    wait_for(lambda: "standby" in (tmp_path / "worker2.log").read_text(errors="replace"), 60,
             "the second worker to wait as a standby")
    # And A0 retrying with step+1 each time (3 s countdown), B0 behind it
    fa.moving.delay(a, 0, 0, 3.0)
    fa.flaky.delay(b, 0)
    schedule = RedisKeys(fa.NS).backoff_schedule(f"{fa.NS}partition.entity.{index}")
    in_transit = RedisKeys(fa.NS).in_transit(f"{fa.NS}partition.entity.{index}")
    wait_for(lambda: client.zcard(schedule) == 1 and client.llen(f"{fa.NS}ran") == 2
             and client.llen(in_transit) == 0, 30, "A set aside, B0 run and acked")
    # When the worker is SIGKILLed during the backoff: the standby takes the partition over
    processes.signal(proc, signal.SIGKILL)
    proc.wait(timeout=10)  # type: ignore[attr-defined]
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 4, 40, "4 runs")
    processes.signal(proc2, signal.SIGTERM)
    proc2.wait(timeout=60)  # type: ignore[attr-defined]
    # Then B0 ran during the backoff, and A0 continued at retry 1 (no extra attempt) with the
    # arguments its retry gave (the message still holds step 0)
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"Order:{a} 0 try0 step0", f"Order:{b} 0 try0", f"Order:{a} 0 try1 step1",
        f"Order:{a} 0 try2 step2"]
    assert not left_behind(client, fa.NS)


def test_a_warm_shutdown_during_a_backoff_leaves_the_key_waiting_in_redis(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, b) = same_partition_orders(fa, 2)
    # Given A0 retries with a 30 s countdown, A1 and B0 behind it
    fa.flaky.delay(a, 0, 1, 30.0)
    fa.flaky.delay(a, 1)
    fa.flaky.delay(b, 0)
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker1.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 2, 30, "A0's first attempt and B0")
    # When the worker is asked to stop warmly during the backoff
    processes.signal(proc, signal.SIGTERM)
    proc.wait(timeout=15)  # type: ignore[attr-defined]  # far less than the 30 s backoff
    # Then B0 ran, A1 did not; A waits in Redis (A0 then A1); the next worker runs them in order
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"Order:{a} 0 try0", f"Order:{b} 0 try0"]
    schedule = RedisKeys(fa.NS).backoff_schedule(f"{fa.NS}partition.entity.{index}")
    ((member, _due),) = client.zrange(schedule, 0, -1, withscores=True)
    parked = RedisKeys(fa.NS).parked("entity", f"Order:{a}")
    assert [message_summary(m).args for m in client.lrange(parked, 0, -1)] == [
        repr((a, 0, 1, 30.0)), repr((a, 1))]
    client.zadd(schedule, {member: 0})  # skip the rest of the wait
    (attempts_key,) = client.scan_iter(match=f"{fa.NS}cp:attempts:*")
    record = json.loads(client.get(attempts_key) or "{}")
    client.set(attempts_key, json.dumps({**record, "resume_at": 0}))
    proc2 = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker2.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 4, 40, "4 runs")
    processes.signal(proc2, signal.SIGTERM)
    proc2.wait(timeout=60)  # type: ignore[attr-defined]
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"Order:{a} 0 try0", f"Order:{b} 0 try0", f"Order:{a} 0 try1", f"Order:{a} 1 try0"]
    assert not left_behind(client, fa.NS)


def seen(client: redis.Redis, fa: ModuleType, task_id: str) -> list[str]:
    """What each attempt of a ``fail.flaky`` message saw (``prerun N``, ``body N``, ...)."""
    return client.lrange(f"{fa.NS}seen:{task_id}", 0, -1)  # type: ignore[return-value]


@pytest.mark.parametrize(("countdown", "failures"), [(0.05, 2), (1.0, 2)],
                         ids=["in-place", "set-aside"])
def test_every_attempt_sees_its_retry_count_in_task_prerun_and_in_the_body(
    countdown: float, failures: int, fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    # Given a message that retries twice (in place below partitioning_retry_hold_below,
    # its key set aside at or above it), then succeeds
    task_id = fa.flaky.delay("r0", 0, failures, countdown).id
    # When a real partition worker runs it
    index = fa.cp.explain_route(fa.app, "fail.flaky", "r0", 0).index
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: len(seen(client, fa, task_id)) >= 9, 60, "three attempts")
    processes.signal(proc, signal.SIGTERM)
    proc.wait(timeout=60)
    # Then each attempt had a prerun and a postrun, and request.retries counted as Celery
    # counts it (0, 1, 2) in task_prerun, in the body and in task_postrun
    assert seen(client, fa, task_id) == [
        "prerun 0", "body 0", "postrun RETRY 0",
        "prerun 1", "body 1", "postrun RETRY 1",
        "prerun 2", "body 2", "postrun SUCCESS 2"]
    assert not left_behind(client, fa.NS)


def test_a_retry_set_aside_when_its_worker_is_sigkilled_resumes_with_its_retry_count(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    # Given a message whose first attempt retries with a 3 s countdown (its key set aside)
    task_id = fa.flaky.delay("k0", 0, 1, 3.0).id
    index = fa.cp.explain_route(fa.app, "fail.flaky", "k0", 0).index
    queue = f"{fa.NS}partition.entity.{index}"
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker1.log")
    schedule = RedisKeys(fa.NS).backoff_schedule(queue)
    in_transit = RedisKeys(fa.NS).in_transit(queue)
    wait_for(lambda: client.zcard(schedule) == 1 and client.llen(in_transit) == 0
             and len(seen(client, fa, task_id)) == 3, 30, "the key set aside, the message acked")
    # When its worker is SIGKILLed during the backoff, and another one starts
    processes.signal(proc, signal.SIGKILL)
    proc.wait(timeout=10)
    proc2 = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker2.log")
    wait_for(lambda: len(seen(client, fa, task_id)) >= 6, 60, "the second attempt")
    processes.signal(proc2, signal.SIGTERM)
    proc2.wait(timeout=60)
    # Then the second attempt ran once, with request.retries 1 from task_prerun on
    assert seen(client, fa, task_id) == [
        "prerun 0", "body 0", "postrun RETRY 0", "prerun 1", "body 1", "postrun SUCCESS 1"]
    assert not left_behind(client, fa.NS)
