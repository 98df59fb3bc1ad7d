"""A broker connection that goes silent (no reset) mid-run: the partitions go on by themselves.

Given `celery partitioning worker` over 2 partitions whose broker is reached through a proxy
(the store, and so the leases, directly), and a keyed stream draining,
when every broker connection open at that moment goes silent for good (a host or network
failure, a server frozen mid-failover: no reset, no answer, the socket stays open),
then each partition thread's blocking fetch gives up after its socket time-out and goes on
on a new connection, and every event runs in order, nothing
lost, without any process restarting (issue 27: without a bound the fetch waited forever,
its lease renewed by the heartbeat, the partition consuming nothing and logging nothing).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from urllib.parse import urlparse

import pytest

from celery_partitioning.store.broker import BROKER_SOCKET_TIMEOUT
from tests.reliability.conftest import Workload, keyed_events
from tests.support.procs import wait_for
from tests.support.proxy import SilentProxy

pytestmark = pytest.mark.integration

#: Seconds the supervisor waits for a warm stop of its children before it kills them.
STOP_TIMEOUT = 5.0


@pytest.mark.timeout(180)
def test_silent_broker_connections_are_left_and_consumption_resumes(
        workload_factory: Callable[..., Workload], records_url: str,
        say: Callable[[str], None]) -> None:
    target = urlparse(records_url)
    with SilentProxy((target.hostname or "127.0.0.1", target.port or 6379)) as proxy:
        broker = f"redis://127.0.0.1:{proxy.port}{target.path}"
        w = workload_factory(2, broker=broker, store=records_url, ms=5)
        w.lease_ttl = 3.0
        events, counts = keyed_events(20, 400, seed=31)
        # A child may not stop warmly after the silence (seen: it waits out the whole
        # --stop-timeout, then is killed): a short one keeps the stop at the end short.
        supervisor = w.start_workers(loglevel="info", processes=1, stop_timeout=STOP_TIMEOUT,
                                     extra=["--without-events"])
        w.publish(events)
        wait_for(lambda: w.done() >= 100, 60, "a quarter of the events to run")
        silenced = proxy.silence()
        done_at_silence = w.done()
        # Each fetch notices within its socket time-out; the rest then runs quickly.
        w.wait_done(len(events), timeout=BROKER_SOCKET_TIMEOUT + 40, counts=counts)
        report = w.report(counts)
        log = w.log_tail(chars=10**7)
        say(f"{silenced} connection(s) silenced after {done_at_silence} done; "
            f"{report.summary()}")
        assert report.ok, report.summary()
        # the socket time-out ended the waits (redis-py then retries on a new connection), not
        # the watchdog that fences a stuck partition thread (that would restart the process)
        assert "exited with" not in log, "a process had to restart:\n" + w.log_tail()
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=STOP_TIMEOUT + 25)
