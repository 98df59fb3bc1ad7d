"""A warm stop of `celery partitioning worker` exits 0 when nothing was cut short, whichever
signal (SIGINT, as Ctrl-C in a terminal, or SIGTERM) reaches it, alone or with its whole
process group. Real supervisor and workers on Redis: the task running at the signal must
finish (recorded by the task itself), and the exit status must be 0. Celery exits 1 after the
warm shutdown a first SIGINT asks for; whether the supervisor's SIGTERM lands before that is a
race, so the rule is also tested without Celery, where it is not."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.apps.harness import Harness
from tests.support.procs import Processes, wait_for


@pytest.mark.integration
@pytest.mark.parametrize(("target", "sig"), [
    ("group", signal.SIGINT),     # Ctrl-C in a terminal
    ("group", signal.SIGTERM),    # kill -TERM -PGID
    ("supervisor", signal.SIGINT),
    ("supervisor", signal.SIGTERM),
], ids=lambda v: v if isinstance(v, str) else signal.Signals(v).name)
def test_a_warm_stop_mid_task_lets_the_task_finish_and_exits_0(
        db11: str, namespace: str, tmp_path: Path, processes: Processes,
        target: str, sig: signal.Signals) -> None:
    # Given a supervisor in its own session (like a shell job) running one partition
    url = db11
    h = Harness(url, url, namespace, 1, tmp_path, processes)
    proc = h.start_workers("workers")
    # and a task that is running when the signal comes (it holds for 4 s, then records its end)
    h.publish([("Order:1", 0, 4000, "started")])
    h.next_signal("started")

    # When the signal reaches the supervisor alone, or its whole process group
    if target == "group":
        processes.signal(proc, sig)
    else:
        proc.send_signal(sig)
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
def test_a_warm_stop_of_an_idle_group_exits_0(db11: str, namespace: str, tmp_path: Path,
                                              processes: Processes, sig: signal.Signals) -> None:
    # Given two partition workers that ran their tasks and now wait for more
    url = db11
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


# Celery-free: the supervisor's rule itself, without the race of a real worker. In "ctrl-c"
# mode the child does what a Celery worker does on a first SIGINT (prints Celery's notice, then
# exits 1 once stopped); in "failure" mode it exits 1 without that notice, as a worker that
# failed would: only the first is a clean stop.
_SUPERVISED = """
import os, signal, sys, time
from celery_partitioning.worker.supervisor import ChildSpec, PartitionSpec, Supervisor

def child(spec):
    code = None
    def on_int(*_):
        nonlocal code
        if os.environ["MODE"] == "ctrl-c":
            print("worker: Hitting Ctrl+C again will initiate cold shutdown, terminating all "
                  "running tasks!", flush=True)
        code = 1
    def on_term(*_):
        nonlocal code
        if os.environ["MODE"] == "failure":
            code = 1
    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGTERM, on_term)
    print("running", flush=True)
    while code is None:
        time.sleep(0.05)
    return code

specs = [ChildSpec((PartitionSpec("p", 0, "q.p.0"),))]
sys.exit(Supervisor(specs, child, stop_timeout=10.0).run())
"""


@pytest.mark.parametrize(("mode", "clean"), [("ctrl-c", True), ("failure", False)])
def test_exit_1_is_clean_only_after_the_childs_own_warm_sigint(
        processes: Processes, tmp_path: Path, mode: str, clean: bool) -> None:
    log = tmp_path / "supervisor.log"
    proc = processes.start([sys.executable, "-c", _SUPERVISED], env={"MODE": mode}, log=log)
    wait_for(lambda: "[p.0] running" in log.read_text(), 20, "the child")

    processes.signal(proc, signal.SIGINT)  # Ctrl-C: the supervisor and its child

    code = proc.wait(timeout=20)
    text = log.read_text()
    if clean:
        assert code == 0 and "stopped cleanly" in text, text
    else:
        assert code == 1 and "p.0 stopped with code 1" in text, text
