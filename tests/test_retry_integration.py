"""In-place retries with real partition workers on a real Redis.

A partitioned task that retries keeps its place: the partition waits out the backoff and
runs the same message again before anything published after it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import ModuleType

import pytest
import redis

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


def test_self_retry_runs_in_place_before_later_messages_of_the_partition(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, b) = same_partition_orders(fa, 2)
    # Given A0 fails twice (self.retry(countdown=0.3)), then succeeds; B shares A's partition
    fa.flaky.delay(a, 0, 2)
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
    assert not list(client.scan_iter(match=f"{fa.NS}cp:attempts:*")), "attempt records left"


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
    wait_for(lambda: client.hlen(f"{fa.NS}cp:dl:entity") == 1, 10, "the dead letter")
    processes.signal(proc, signal.SIGTERM)
    proc.wait(timeout=60)  # a warm stop: the last task records its end before the worker exits
    # Then it ran 3 times in place (backoff), B ran, A1 did not run: it is parked
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"Order:{a} 0"] * 3 + [f"Order:{b} 0"]
    (record,) = [json.loads(v) for v in client.hvals(f"{fa.NS}cp:dl:entity")]
    assert record["key"] == f"Order:{a}" and record["task"] == "fail.step"
    assert record["reason"] == "MAX_RETRIES_EXCEEDED" and record["attempts"] == 3
    assert record["error"].startswith("ConnectionError: transient fault")
    assert "Traceback" in record["traceback"] and record["partition"] == index
    assert record["raw"] and json.loads(record["raw"])["headers"]["id"] == record["id"]


def test_a_worker_killed_during_a_backoff_resumes_the_same_attempt_and_arguments(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, b) = same_partition_orders(fa, 2)
    # Given A0 retries with step+1 each time (3 s countdown), and B0 behind it
    fa.moving.delay(a, 0, 0, 3.0)
    fa.flaky.delay(b, 0)
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker1.log")
    wait_for(lambda: bool(list(client.scan_iter(match=f"{fa.NS}cp:attempts:*"))), 30,
             "the first retry to be recorded")
    # When the worker is SIGKILLed during the backoff and another one starts
    processes.signal(proc, signal.SIGKILL)
    proc.wait(timeout=10)  # type: ignore[attr-defined]
    proc2 = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker2.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 4, 40, "4 runs")
    processes.signal(proc2, signal.SIGTERM)
    # Then A0 continued at retry 1 (no extra attempt) with the arguments its retry gave (the
    # message still holds step 0), still before B0
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"Order:{a} 0 try0 step0", f"Order:{a} 0 try1 step1", f"Order:{a} 0 try2 step2",
        f"Order:{b} 0 try0"]


def test_a_warm_shutdown_during_a_backoff_stops_at_once_and_keeps_the_message_first(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    index, (a, b) = same_partition_orders(fa, 2)
    # Given A0 retries with a 30 s countdown, B0 behind it
    fa.flaky.delay(a, 0, 1, 30.0)
    fa.flaky.delay(b, 0)
    proc = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker1.log")
    wait_for(lambda: bool(list(client.scan_iter(match=f"{fa.NS}cp:attempts:*"))), 30,
             "the first retry to be recorded")
    # When the worker is asked to stop warmly during the backoff
    processes.signal(proc, signal.SIGTERM)
    proc.wait(timeout=15)  # type: ignore[attr-defined]  # far less than the 30 s backoff
    # Then B0 did not run, and the next worker runs A0 (retry 1) first, then B0
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [f"Order:{a} 0 try0"]
    (attempts_key,) = client.scan_iter(match=f"{fa.NS}cp:attempts:*")
    record = json.loads(client.get(attempts_key) or "{}")
    client.set(attempts_key, json.dumps({**record, "resume_at": 0}))  # skip the rest of the wait
    proc2 = start_partition_worker(processes, fa, "entity", index, tmp_path / "worker2.log")
    wait_for(lambda: client.llen(f"{fa.NS}ran") >= 3, 40, "3 runs")
    processes.signal(proc2, signal.SIGTERM)
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"Order:{a} 0 try0", f"Order:{a} 0 try1", f"Order:{b} 0 try0"]
