"""Many partitions per process: spreading, isolation between partition threads, the toolbox.

A partition worker process hosts several partitions, each consumed by a thread of its own;
these tests run real `celery partitioning worker` commands on a real Redis.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from celery_partitioning import partition_for
from celery_partitioning.errors import PartitionConfigError
from celery_partitioning.worker.supervisor import PartitionSpec, spread, worker_argv
from tests.apps.harness import HOLD_MS, Harness, keyed_events
from tests.support.ordering import check
from tests.support.procs import ROOT, Processes, celery_bin, wait_for

# -- spreading partitions over processes ----------------------------------------------------

def test_partitions_are_dealt_over_processes_deterministically() -> None:
    parts = [PartitionSpec("entity", i, f"partition.entity.{i}") for i in range(5)] + [
        PartitionSpec("global", 0, "partition.global.0")]
    # Given 6 partitions over 4 processes: partition i goes to process i mod 4
    children = spread(parts, 4)
    assert [[p.label for p in c.partitions] for c in children] == [
        ["entity.0", "entity.4"], ["entity.1", "global.0"], ["entity.2"], ["entity.3"]]
    assert [c.label for c in children] == ["w0", "w1", "entity.2", "entity.3"]
    assert children[0].env_value == "entity:0,entity:4"
    # And the same input gives the same layout, every time (a restart hosts the same share)
    assert spread(parts, 4) == children
    # And one process hosts them all
    [single] = spread(parts, 1)
    assert len(single.partitions) == 6 and single.node == "partitions0@%h"


@pytest.mark.parametrize("processes", [0, -1, 7])
def test_a_process_count_that_cannot_be_used_is_refused(processes: int) -> None:
    parts = [PartitionSpec("entity", i, f"partition.entity.{i}") for i in range(6)]
    with pytest.raises(PartitionConfigError, match=r"--processes .*choose 1 to 6"):
        spread(parts, processes)


def test_an_empty_selection_is_refused() -> None:
    with pytest.raises(PartitionConfigError, match="no partition selected"):
        spread([], 1)


def test_a_partition_worker_process_is_a_celery_node_with_task_events() -> None:
    [child] = spread([PartitionSpec("entity", 0, "partition.entity.0"),
                      PartitionSpec("entity", 1, "partition.entity.1")], 1)
    argv = worker_argv(child, ["-A", "proj"], "info", idle_queue="partition.idle")
    assert argv[argv.index("-Q") + 1] == "partition.idle"
    assert "-E" in argv and "--without-heartbeat" not in argv
    assert "-E" not in worker_argv(child, ["-A", "proj"], "info", idle_queue="partition.idle",
                                   events=False)


@pytest.mark.integration
@pytest.mark.parametrize("args, says", [
    (["--processes", "0"], "--processes 0: choose 1 to 3"),
    (["--processes", "4"], "--processes 4: choose 1 to 3"),
    (["--partitions", "7"], "pool 'p' has partitions 0-2"),
])
def test_the_worker_command_refuses_bad_process_counts_with_one_line(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path,
        args: list[str], says: str) -> None:
    h = Harness(redis_url, redis_url, namespace, 3, tmp_path, processes)
    done = h.cli("worker", *args)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], done.stderr


# -- partition threads in one process --------------------------------------------------------

def _keys_of(partition: int, partitions: int, count: int) -> list[str]:
    keys = [f"Order:{i}" for i in range(500) if partition_for(f"Order:{i}", partitions) == partition]
    return keys[:count]


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_a_partition_whose_task_hangs_does_not_hold_up_the_others_and_the_toolbox_answers(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, 2, tmp_path, processes)
    # Given one worker process hosting both partitions of the pool
    sup = h.start_workers("w", "--processes", "1")
    wait_for(lambda: "consuming" in h.log_text("w") and h.log_text("w").count("consuming") >= 2,
             60, "both partitions to consume")
    # When a task of partition 0 hangs (30 s), and partition 1 gets 60 events meanwhile
    [slow_key] = _keys_of(0, 2, 1)
    h.publish([(slow_key, 0, HOLD_MS, "slow")])
    pid, label, _key, _seq = h.next_signal("slow", timeout=60)
    assert label == "p.0"
    keys = _keys_of(1, 2, 6)
    events = [(keys[i % 6], i // 6, 2, None) for i in range(60)]
    h.publish(events)
    # Then partition 1 runs all of them, in order, while partition 0 is still in its task
    h.wait_done(60, timeout=60, logs=["w"])
    assert h.records([slow_key])[slow_key] == ["start 0"]  # not finished
    report = check(h.records(keys), {k: 10 for k in keys})
    assert report.ok, report.summary()
    assert {p for _k, p, _key, _s in h.partition_log("p.1")} == {pid}  # the same process

    # And the process is a Celery node that answers while that task runs
    env = {**os.environ, "PYTHONPATH": str(ROOT), **h.env()}
    active = subprocess.run(
        # -d: the reply of the one node ends the wait (without it, inspect waits its timeout)
        [celery_bin(), "-A", "tests.apps.ordering_app", "inspect", "active", "--json", "-t", "20",
         "-d", f"partitions0@{socket.gethostname()}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert active.returncode == 0, active.stderr
    replies: dict[str, Any] = json.loads(active.stdout)
    [(name, running)] = replies.items()
    assert name.startswith("partitions0@")
    assert [t["name"] for t in running] == ["ordering.record"]
    assert running[0]["args"][0] == slow_key
    assert h.records([slow_key])[slow_key] == ["start 0"]  # still running when it answered

    # And `celery control shutdown` stops the fleet: the task finishes, nothing restarts
    shut = subprocess.run([celery_bin(), "-A", "tests.apps.ordering_app", "control", "shutdown",
                           "-t", "1"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    # (a worker shutting down sends no reply, so the command may say none came: that is Celery)
    assert shut.returncode == 0 or "No nodes replied" in shut.stderr, shut.stderr
    h.release(slow_key, 0)  # the task ends now; the stop waited for it
    assert sup.wait(timeout=90) == 0, h.log_text("w")[-3000:]
    assert h.records([slow_key])[slow_key] == ["start 0", "end 0"]
    assert "restarting" not in h.log_text("w")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_every_partitioned_task_sends_events_and_status_names_process_and_thread(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    h = Harness(url, url, namespace, 2, tmp_path, processes)
    app = h.app()
    seen: list[str] = []
    heard = threading.Event()  # any event: the listener is subscribed and the worker is up

    def receive() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={
                "task-succeeded": lambda event: seen.append(event["uuid"]),
                "*": lambda event: heard.set()})
            for _ in receiver.itercapture(limit=None, timeout=60, wakeup=False):
                if len(seen) >= 20:
                    return

    listener = threading.Thread(target=receive, daemon=True)
    listener.start()
    # Given the default worker command (task events on, worker heartbeats on)
    h.start_workers("w", "--processes", "1")
    assert heard.wait(60), "no event from the worker (worker-online, heartbeats)"
    events, _counts = keyed_events(8, 20, ms=2)
    h.publish(events)
    h.wait_done(20, timeout=60, logs=["w"])
    # Then a task-succeeded event arrived for every task
    listener.join(timeout=40)
    assert len(seen) == 20
    # And status names the process (node, pid) and the partition thread holding each lease
    status = h.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    consumers = [row["consumer"] for row in json.loads(status.stdout)["partitions"]]
    assert all(c and c.startswith("partitions0@") for c in consumers), consumers
    assert [c.split("#")[1].split(" ")[0] for c in consumers] == ["p.0", "p.1"]
    assert len({c.split("(pid ")[1] for c in consumers}) == 1  # one process
