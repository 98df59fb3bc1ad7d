"""A partition worker restarted while its store is down waits for it instead of exiting (issue 27).

Given `celery partitioning worker` over 2 partitions in one process, its partitioning store a
private Redis of its own (the broker apart), and a keyed stream draining,
when the store dies (SIGKILL), so the holders fence themselves (exit 75) and the supervisor
restarts the process while the store is still down,
then the new process says it waits for the store (one WARNING line per attempt) and does not
exit, and once the store is back (same port, same data) it consumes again: every event ran,
in order, nothing lost, and no process ever exited with status 1 (before: exit 1 after
0.0 s, restarted on a growing backoff, the reason not in the log).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.conftest import PrivateRedis, Workload, keyed_events
from tests.support.procs import Processes, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
def test_a_restart_while_the_store_is_down_waits_for_it(
        workload_factory: Callable[..., Workload], processes: Processes, tmp_path: Path,
        say: Callable[[str], None]) -> None:
    (tmp_path / "store").mkdir()
    store = PrivateRedis(processes, tmp_path / "store")
    store.start()
    w = workload_factory(2, store=store.url, ms=2)
    w.lease_ttl = 2.0
    events, counts = keyed_events(20, 300, seed=44)
    first, rest = events[:150], events[150:]
    supervisor = w.start_workers(loglevel="info", processes=1)
    w.publish(first)
    w.wait_done(len(first), timeout=60, counts=None)
    store.kill()
    wait_for(lambda: "exited with code 75" in w.log_tail(chars=10**6), 30,
             "the holders to fence themselves")
    restarted = re.compile(r"exited with code 75.*\n(.*\n)*.*partition worker start-up: the "
                           r"broker or the partitioning store is unreachable")
    wait_for(lambda: restarted.search(w.log_tail(chars=10**6)) is not None, 30,
             "the restarted process to wait for the store")
    w.publish(rest)
    store.start()  # same port, same data (AOF)
    w.wait_done(len(events), timeout=60, counts=counts)
    report = w.report(counts)
    log = w.log_tail(chars=10**7)
    exits = re.findall(r"exited with code (\d+)", log)
    say(f"process exits: {exits}; {report.summary()}")
    assert report.ok, report.summary()
    assert set(exits) == {"75"}, exits
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(timeout=30)
