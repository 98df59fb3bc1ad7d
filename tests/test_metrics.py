"""Built-in Prometheus metrics: ``partitioning worker --metrics-port`` and ``partitioning exporter``.

Real processes: a supervised partition worker (two processes) runs keyed tasks, some retried
in place, one failing for good (its key parked, the key's next message set aside), then the
test reads /metrics over HTTP; the exporter command reads a queue nobody consumes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_partitioning import partition_for
from celery_partitioning.metrics import HALF_LIFE_ENV, key_label
from celery_partitioning.metrics.hotkeys import HotKeys, merge, read_snapshots
from celery_partitioning.metrics.queue import depth_skew
from tests.support.procs import Processes, celery_bin, wait_for

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            found.append((match.group(1), dict(_LABEL.findall(match.group(3) or "")),
                          float(match.group(4))))
    return found


def total(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, ls, v in found if n == name and all(ls.get(k) == w for k, w in labels.items()))


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return samples(resp.read().decode())
    except OSError:
        return []


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    yield p
    p.kill_all()


def _env(redis_url: str, ns: str) -> dict[str, str]:
    return {"CP_REDIS_URL": redis_url, "CP_NS": ns}


def _app(redis_url: str, ns: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in _env(redis_url, ns).items():
        monkeypatch.setenv(name, value)  # the app module reads them when (re)loaded
    import importlib

    import tests.apps.metrics_app as ma

    return importlib.reload(ma)


# -- units -------------------------------------------------------------------------------------

def test_keys_are_hashed_unless_raw_and_hot_keys_are_bounded_and_merged(tmp_path: Path) -> None:
    assert key_label("Order:1") != "Order:1" and len(key_label("Order:1")) == 16
    assert key_label("Order:1", raw=True) == "Order:1"
    hot = HotKeys(tmp_path)
    for i in range(30):
        for _ in range(i):
            hot.count("entity", i % 2, f"k{i}")
    hot.flush(every=0)
    top, partitions = merge(read_snapshots(tmp_path))
    assert [k for k, _ in top["entity"]] == [f"k{i}" for i in range(29, 19, -1)]  # top 10
    assert partitions["entity"] == {0: sum(range(0, 30, 2)), 1: sum(range(1, 30, 2))}
    assert depth_skew([0, 0]) == 0 and depth_skew([3, 1]) == 1.5


def test_metrics_port_without_prometheus_client_names_the_extra(redis_url: str,
                                                                namespace: str) -> None:
    # Given an interpreter where prometheus_client cannot be imported
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from celery.bin.celery import main; sys.argv = sys.argv[1:]; main()")
    for argv in (["worker", "--metrics-port", str(free_port())], ["exporter", "--port", "1"]):
        # When the worker is asked for metrics, or the exporter runs
        result = subprocess.run(
            [sys.executable, "-c", code, "celery", "-A", "tests.apps.metrics_app", "partitioning",
             *argv], capture_output=True, text=True, timeout=60,
            env={**os.environ, **_env(redis_url, namespace)}, cwd=Path(__file__).parents[1])
        # Then it is one line naming the extra, exit 2, nothing started
        assert result.returncode == 2, result.stderr
        assert "pip install 'celery-partitioning[prometheus]'" in result.stderr


def test_the_dashboard_and_the_alert_rules_name_only_exported_metrics() -> None:
    root = Path(__file__).parents[1]
    source = "\n".join(p.read_text() for p in (root / "celery_partitioning" / "metrics").glob("*.py"))
    exported: set[str] = set()
    for kind, name in re.findall(r'(Counter|Histogram|GaugeMetricFamily|_gauge)\(\s*"(celery_partitioning_\w+)"',
                                 source):
        exported |= ({f"{name}_total"} if kind == "Counter" else
                     {f"{name}_{s}" for s in ("bucket", "count", "sum")} if kind == "Histogram" else
                     {name})
    assert len(exported) >= 20
    # the stalled gauge is exported once `partitioning status` reports `stalled`
    exported.add("celery_partitioning_partition_stalled")
    for path in ("deploy/grafana/celery-partitioning.json",
                 "deploy/prometheus/celery-partitioning-alerts.yaml"):
        used = set(re.findall(r"celery_partitioning_\w+", (root / path).read_text()))
        assert used and used - exported == set(), path


@pytest.mark.integration
def test_lease_hooks_count_an_acquisition_once_and_a_fence_before_it_fences(
        redis_url: str, namespace: str) -> None:
    import redis

    from celery_partitioning.store.lease import Lease

    client = redis.Redis.from_url(redis_url)
    events: list[str] = []
    lease = Lease(client, f"{namespace}lease-hooks", 1.5, token="t1",
                  fence=lambda reason: events.append("fenced"))
    lease.on_acquire.append(lambda: events.append("acquired"))
    lease.on_fence.append(lambda reason: events.append(f"hook: {reason[:14]}"))
    # Given a lease taken, and asked for again while held
    assert lease.try_acquire() and lease.try_acquire()
    assert events == ["acquired"]
    lease.start_heartbeat()
    # When another worker takes it
    client.set(f"{namespace}lease-hooks", "t2|other|1|x", px=60_000)
    # Then the hook runs, then the fence
    wait_for(lambda: "fenced" in events, 10, "the fence")
    assert events == ["acquired", "hook: lost the lease", "fenced"]
    lease.release()


# -- real processes ------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(240)
def test_worker_metrics_port_exports_every_metric(redis_url: str, namespace: str, tmp_path: Path,
                                                   procs: Processes,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ma = _app(redis_url, namespace, monkeypatch)
    # Given keyed tasks: 5 keys x 5 messages, seq 2 of each retried once in place, and a key
    # whose first message fails for good (its second is then set aside behind the dead letter)
    calls = [(f"{k}", s, 1 if s == 2 else 0, False) for s in range(5) for k in range(5)]
    calls += [("bad", 0, 0, True), ("bad", 1, 0, False)]
    for order_id, seq, retries, fail in calls:
        ma.work.delay(order_id, seq, retries=retries, fail=fail)
    port = free_port()

    # When a partition worker with --metrics-port drains them
    log = tmp_path / "worker.log"
    worker = procs.start([celery_bin(), "-A", "tests.apps.metrics_app", "partitioning", "worker",
                          "--processes", "2", "--metrics-port", str(port), "--stop-timeout", "30"],
                         env={**_env(redis_url, namespace), HALF_LIFE_ENV: "3600"}, log=log)
    client = ma._client

    def drained() -> bool:
        assert worker.poll() is None, log.read_text()[-5000:]
        return client.llen(f"{namespace}done") >= 26 and all(
            client.llen(f"{namespace}partition.entity.{i}") == 0 for i in range(2))

    try:
        wait_for(drained, 150, "the tasks to run")
    except AssertionError:
        raise AssertionError(f"done: {client.lrange(f'{namespace}done', 0, -1)}\n"
                             f"{log.read_text()[-5000:]}") from None
    found: list[tuple[str, dict[str, str], float]] = []

    def settled() -> bool:  # counters, gates and the hot-key flush land just after the tasks
        nonlocal found
        found = scrape(port)
        return (total(found, "celery_partitioning_processed_total") == 26
                and total(found, "celery_partitioning_skipped_total") == 1
                and total(found, "celery_partitioning_parked_keys") == 1
                and total(found, "celery_partitioning_hot_key_messages") >= 26)

    try:
        wait_for(settled, 60, "/metrics to show the drained run", interval=0.5)
    except AssertionError:
        raise AssertionError(f"last scrape: {found}\n{log.read_text()[-4000:]}") from None

    # Then every metric is there, with the values of the run
    assert total(found, "celery_partitioning_failed_total") == 1
    assert total(found, "celery_partitioning_retried_total") == 5
    assert total(found, "celery_partitioning_skipped_total", gate="parking gate") == 1
    assert total(found, "celery_partitioning_task_duration_seconds_count") == 26 + 5
    assert total(found, "celery_partitioning_task_duration_seconds_sum") > 0
    for i in ("0", "1"):
        assert total(found, "celery_partitioning_queue_depth", partition=i) == 0
        assert total(found, "celery_partitioning_lag_seconds", partition=i) >= 0
        assert [n for n, ls, v in found if n == "celery_partitioning_lag_seconds"
                and ls["partition"] == i]
        holders = [ls["holder"] for n, ls, v in found
                   if n == "celery_partitioning_partition_holder" and ls["partition"] == i and v == 1]
        assert len(holders) == 1 and f"#entity.{i}" in holders[0]
        assert total(found, "celery_partitioning_partition_has_holder", partition=i) == 1
        assert total(found, "celery_partitioning_lease_handovers_total", partition=i) == 1
        assert [n for n, ls, v in found if n == "celery_partitioning_lease_fences_total"
                and ls["partition"] == i and v == 0]
        assert [n for n, ls, v in found if n == "celery_partitioning_backoff_keys"
                and ls["partition"] == i]
    hot = {ls["key"]: v for n, ls, v in found if n == "celery_partitioning_hot_key_messages"}
    assert len(hot) == 6 and hot[key_label("Order:0")] == 5 and hot[key_label("Order:bad")] == 1
    assert "Order:0" not in hot  # hashed by default
    assert total(found, "celery_partitioning_pool_skew", pool="entity") >= 1
    assert [n for n, ls, v in found if n == "celery_partitioning_pool_depth_skew"]
    assert total(found, "celery_partitioning_pool_rebalancing", pool="entity") == 0
    assert total(found, "celery_partitioning_exporter_up") == 1

    # And a warm stop removes the multiprocess directory and stops the server
    procs.signal(worker, signal.SIGTERM)
    assert worker.wait(60) == 0, log.read_text()[-3000:]
    assert scrape(port) == []
    made = re.findall(r"celery-partitioning-metrics-\w+", log.read_text())
    assert not any(Path("/tmp", d).exists() for d in made)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_exporter_shows_the_depth_of_a_waiting_queue(redis_url: str, namespace: str,
                                                     procs: Processes, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ma = _app(redis_url, namespace, monkeypatch)
    # Given 17 messages waiting and no worker
    for seq in range(17):
        ma.work.delay("7", seq)
    index = partition_for("Order:7", 2)
    port = free_port()

    # When the exporter runs
    log = tmp_path / "exporter.log"
    exporter = procs.start([celery_bin(), "-A", "tests.apps.metrics_app", "partitioning", "exporter",
                            "--port", str(port), "--address", "127.0.0.1"],
                           env=_env(redis_url, namespace), log=log)
    found: list[tuple[str, dict[str, str], float]] = []

    def up() -> bool:
        nonlocal found
        found = scrape(port)
        return bool(found)

    wait_for(up, 60, f"the exporter on {port}\n{log}", interval=0.3)

    # Then its /metrics shows the depth of that queue, no holder, lag of the waiting messages
    assert total(found, "celery_partitioning_queue_depth") == 17
    deep = [ls for n, ls, v in found if n == "celery_partitioning_queue_depth" and v == 17]
    assert len(deep) == 1 and deep[0]["partition"] == str(index)
    assert total(found, "celery_partitioning_partition_has_holder") == 0
    assert total(found, "celery_partitioning_lag_seconds", partition=deep[0]["partition"]) > 0
    assert total(found, "celery_partitioning_pool_depth_skew", pool="entity") == 2.0
    assert not [n for n, _ls, _v in found if n.startswith("celery_partitioning_processed")]
    procs.signal(exporter, signal.SIGTERM)
    assert exporter.wait(30) == 0


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_counters_of_a_killed_process_keep_counting(redis_url: str, namespace: str, tmp_path: Path,
                                                    procs: Processes,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ma = _app(redis_url, namespace, monkeypatch)
    port = free_port()
    log = tmp_path / "worker.log"
    # Given a worker of one process with --metrics-port that ran 6 tasks, all acked
    procs.start([celery_bin(), "-A", "tests.apps.metrics_app", "partitioning", "worker",
                 "--processes", "1", "--metrics-port", str(port), "--stop-timeout", "30"],
                env=_env(redis_url, namespace), log=log)
    for seq in range(6):
        ma.work.delay(str(seq % 3), seq)
    found: list[tuple[str, dict[str, str], float]] = []

    def counted(processed: int, handovers: int) -> bool:
        nonlocal found
        found = scrape(port)
        return (total(found, "celery_partitioning_processed_total") == processed
                and total(found, "celery_partitioning_lease_handovers_total") == handovers
                and total(found, "celery_partitioning_unacked") == 0
                and total(found, "celery_partitioning_queue_depth") == 0
                and total(found, "celery_partitioning_partition_has_holder") == 2)

    try:
        wait_for(lambda: counted(6, 2), 90, "6 tasks counted", interval=0.3)
        first = [int(pid) for pid in re.findall(r"started w0 \(pid (\d+)\)", log.read_text())]
        assert len(first) == 1

        # When that process is SIGKILLed, the supervisor starts another, and 4 more tasks run
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: len(re.findall(r"started w0 \(pid", log.read_text())) == 2, 60,
                 "the restart")
        for seq in range(6, 10):
            ma.work.delay(str(seq % 3), seq)

        # Then the sums count both processes: 10 processed, each partition taken twice
        wait_for(lambda: counted(10, 4), 90, "10 tasks counted", interval=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast scrape: {found}\n{log.read_text()[-4000:]}") from None
    assert total(found, "celery_partitioning_task_duration_seconds_count") == 10
