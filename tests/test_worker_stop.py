"""A warm stop of `celery partitioning worker` exits 0 when nothing was cut short, whichever
signal (SIGINT, as Ctrl-C in a terminal, or SIGTERM) reaches it, alone or with its whole
process group. Real supervisor and workers on Redis: the task running at the signal must
finish (recorded by the task itself), and the exit status must be 0. That holds because a
partition worker process itself takes a first SIGINT as a warm stop and exits 0 (Celery's own
handler exits 1), which is also tested on one process alone."""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.apps.harness import HOLD_MS, Harness
from tests.support.procs import Processes, alive, celery_bin, wait_for

#: What Celery prints when a worker process takes a stop signal (a first one: warm).
WARM = "Warm shutdown (MainProcess)"
#: What the worker logs once its warm stop began (it then waits for the running tasks).
WARM_STOP = "warm stop: every partition finishes its task and starts no other"


def _stop_taken_mid_task(h: Harness, proc: subprocess.Popen[bytes], log: str) -> None:
    """Wait until the worker process began its warm stop, then check that it waits for the
    held task (still running, not ended) and end the hold: the task finishes now."""
    wait_for(lambda: WARM_STOP in h.log_text(log), 30, "the worker to begin its warm stop")
    assert alive(proc.pid) and h.records(["Order:1"]) == {"Order:1": ["start 0"]}, h.log_text(log)
    h.release("Order:1", 0)


@pytest.mark.integration
@pytest.mark.parametrize(("target", "sig"), [
    ("group", signal.SIGINT),     # Ctrl-C in a terminal
    ("group", signal.SIGTERM),    # kill -TERM -PGID
    ("supervisor", signal.SIGINT),
    ("supervisor", signal.SIGTERM),
], ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name)
def test_a_warm_stop_mid_task_lets_the_task_finish_and_exits_0(
        redis_url: str, namespace: str, tmp_path: Path, processes: Processes,
        target: str, sig: signal.Signals) -> None:
    # Given a supervisor in its own session (like a shell job) running one partition
    url = redis_url
    h = Harness(url, url, namespace, 1, tmp_path, processes)
    proc = h.start_workers("workers")
    # and a task that is running when the signal comes (it holds until released, then
    # records its end)
    h.publish([("Order:1", 0, HOLD_MS, "started")])
    h.next_signal("started")

    # When the signal reaches the supervisor alone, or its whole process group
    if target == "group":
        processes.signal(proc, sig)
    else:
        proc.send_signal(sig)
    _stop_taken_mid_task(h, proc, "workers")
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the supervisor did not stop within 60 s\n" + h.log_text("workers")) from None

    # Then the running task finished, and the supervisor says so and exits 0
    log = h.log_text("workers")
    assert h.records(["Order:1"]) == {"Order:1": ["start 0", "end 0"]}, log
    assert "[supervisor] stopped cleanly" in log, log
    assert code == 0, log


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_warm_stop_of_an_idle_group_exits_0(redis_url: str, namespace: str, tmp_path: Path,
                                              processes: Processes, sig: signal.Signals) -> None:
    # Given two partition workers that ran their tasks and now wait for more
    url = redis_url
    h = Harness(url, url, namespace, 2, tmp_path, processes)
    proc = h.start_workers("workers")
    h.publish([(f"Order:{i}", 0, 1, None) for i in range(6)])
    h.wait_done(6, timeout=60, logs=["workers"])

    # When the whole process group gets the signal (Ctrl-C in a terminal)
    processes.signal(proc, sig)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the supervisor did not stop within 60 s\n" + h.log_text("workers")) from None

    # Then it exits 0: nothing was cut short
    log = h.log_text("workers")
    assert "[supervisor] stopped cleanly" in log, log
    assert code == 0, log


def _bare_worker(h: Harness, processes: Processes, name: str) -> subprocess.Popen[bytes]:
    """One partition worker process, exactly as the supervisor starts it (partition p.0)."""
    argv = [celery_bin(), "-A", "tests.apps.ordering_app", "worker", "-Q", f"{h.ns}partition.idle",
            "-P", "solo", "-c", "1", "--prefetch-multiplier", "1", "--without-gossip",
            "--without-mingle", "-n", f"p.0-{uuid.uuid4().hex[:6]}@%h", "-l", "info"]
    return processes.start(argv, env={**h.env(), "CELERY_PARTITIONING_PARTITIONS": "p:0"},
                           log=h.log(name))


@pytest.mark.integration
@pytest.mark.parametrize("signals", [1, 2], ids=["one SIGINT", "two SIGINTs"])
def test_a_partition_worker_takes_a_first_sigint_as_a_warm_stop_and_exits_0(
        redis_url: str, namespace: str, tmp_path: Path, processes: Processes, signals: int) -> None:
    # Given a partition worker process (no supervisor) inside a task that holds until released
    h = Harness(redis_url, redis_url, namespace, 1, tmp_path, processes)
    proc = _bare_worker(h, processes, "child")
    h.publish([("Order:1", 0, HOLD_MS, "started")])
    h.next_signal("started")

    # When it gets SIGINT (Ctrl-C), once, or twice (the second once it took the first)
    proc.send_signal(signal.SIGINT)
    if signals == 1:
        _stop_taken_mid_task(h, proc, "child")
    else:
        wait_for(lambda: WARM in h.log_text("child"), 30, "the worker to take the first SIGINT")
        proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the worker did not stop within 60 s\n" + h.log_text("child")) from None

    log = h.log_text("child")
    if signals == 1:
        # Then the first is a warm stop: the task finished, and the process exits 0 (not
        # Celery's 1), so a supervisor sees a clean stop without reading Celery's output
        assert h.records(["Order:1"]) == {"Order:1": ["start 0", "end 0"]}, log
        assert code == 0, log
    else:
        # the second is Celery's cold shutdown: the task is cut short, the exit is not clean
        assert h.records(["Order:1"]) == {"Order:1": ["start 0"]}, log
        assert code != 0, log
