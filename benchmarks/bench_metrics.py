"""What ``--metrics-port`` costs: drain throughput with and without it, in the same run.

The same M messages (over K keys, a pool of N partitions on P processes) are drained by
``celery partitioning worker`` twice per round, once plain and once with ``--metrics-port``
while a scraper reads /metrics every ``BENCH_METRICS_SCRAPE`` seconds (Prometheus scrapes
every 15-60 s; 1 s is harsher). Rounds alternate the order (``common.interleaved``) so a
loaded machine's noise falls on both alike. Goal: metrics cost <= 3 % (ratio <= 1.03).

    python -m benchmarks.bench_metrics   # BENCH_METRICS_MESSAGES=2000 BENCH_METRICS_KEYS=256
                                         # BENCH_METRICS_PARTITIONS=4 BENCH_METRICS_PROCESSES=2
                                         # BENCH_METRICS_MS=0 BENCH_METRICS_ROUNDS=3
                                         # BENCH_METRICS_SCRAPE=1
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import redis

from benchmarks.bench_app import PARTITIONED_TASK, make_app
from benchmarks.bench_drain import READY_TIMEOUT, ROOT, STOP_TIMEOUT, _celery, _start, _stop
from benchmarks.common import (
    Table,
    bench_namespace,
    delete_namespace,
    env_float,
    env_int,
    interleaved,
    machine,
    redis_url,
)
from celery_partitioning import partition_for

__all__ = ["drain", "main"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape_until(port: int, every: float, stop: threading.Event, scrapes: list[float]) -> None:
    while not stop.wait(every):
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                resp.read()
        except OSError:
            continue
        scrapes.append(time.monotonic() - started)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid``'s descendants so far (workers and the metrics server)."""
    total = 0.0
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def drain(metrics: bool, partitions: int, processes: int, ms: float, messages: int, keys: int,
          log_dir: Path, scrape_every: float, scrapes: list[float],
          cpu: dict[bool, list[float]] | None = None) -> float:
    """Seconds to drain ``messages`` (first task start to last task end); the CPU the
    worker's processes spent in the drain goes to ``cpu[metrics]``."""
    url = redis_url()
    ns = bench_namespace("metrics")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_BROKER": url, "BENCH_NS": ns,
           "BENCH_PARTITIONS": str(partitions)}
    app = make_app(url, ns, partitions)
    client = redis.Redis.from_url(url)
    names = [f"Order:{i}" for i in range(keys)]
    busy = {partition_for(names[i % keys], partitions) for i in range(messages)}
    procs = []
    stop = threading.Event()
    scraper = None
    try:
        task = app.tasks[PARTITIONED_TASK]
        with app.producer_or_acquire() as producer:
            for i in range(messages):
                task.apply_async((names[i % keys],), {"ms": ms}, producer=producer)
        port = _free_port()
        extra = ["--metrics-port", str(port)] if metrics else []
        log = log_dir / f"metrics-{'on' if metrics else 'off'}.log"
        procs.append(_start([_celery(), "-A", "benchmarks.bench_app", "partitioning", "worker",
                             "-l", "warning", "--stop-timeout", str(STOP_TIMEOUT),
                             "--processes", str(processes), *extra], env, log))
        deadline = time.monotonic() + READY_TIMEOUT
        while client.scard(f"{ns}ready") < len(busy):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"workers did not get ready; see {log}")
            time.sleep(0.05)
        if metrics:
            scraper = threading.Thread(target=_scrape_until, args=(port, scrape_every, stop, scrapes),
                                       daemon=True)
            scraper.start()
        cpu_before = _cpu_seconds(procs[0].pid)
        start = time.time()
        client.set(f"{ns}go", "1")
        deadline = time.monotonic() + max(120.0, messages * (ms + 20) / 1000)
        while int(client.get(f"{ns}done") or 0) < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain timed out; see {log}")
            time.sleep(0.02)
        if cpu is not None:
            cpu.setdefault(metrics, []).append(_cpu_seconds(procs[0].pid) - cpu_before)
        return float(client.get(f"{ns}last") or 0) - start
    finally:
        stop.set()
        if scraper is not None:
            scraper.join(15)
        _stop(procs)
        client.close()
        app.close()
        delete_namespace(url, ns)


def counting_cost(calls: int = 20_000) -> float:
    """µs per message of what a worker process adds per message, in this process: Celery's
    three task signals with our receivers connected (minus without), two counter increments,
    one histogram observation into multiprocess files, a hot-key count and its digest."""
    import tempfile

    from celery import Celery, signals

    with tempfile.TemporaryDirectory() as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        from prometheus_client import CollectorRegistry, Counter, Histogram, values

        values.ValueClass = values.get_value_class()
        from celery_partitioning.metrics import key_label
        from celery_partitioning.metrics.hotkeys import HotKeys

        registry = CollectorRegistry()
        counter = Counter("bench_c", "c", ["pool", "partition"], registry=registry).labels("p", "0")
        histogram = Histogram("bench_h", "h", ["pool", "partition"], registry=registry).labels("p", "0")
        hot = HotKeys(Path(directory))
        app = Celery(set_as_current=False)

        def noop() -> None:
            pass

        task = app.task(noop, name="bench.noop")
        app.finalize()

        def send_all() -> float:
            started = time.perf_counter()
            for _ in range(calls):
                signals.task_prerun.send(sender=task, task_id="x", task=task, args=(), kwargs={})
                signals.task_postrun.send(sender=task, task_id="x", task=task, args=(), kwargs={},
                                          retval=None, state="SUCCESS")
                signals.task_success.send(sender=task, result=None)
            return time.perf_counter() - started

        bare = send_all()
        receivers = [lambda *a, **k: None for _ in range(3)]
        for signal, receiver in zip((signals.task_prerun, signals.task_postrun, signals.task_success),
                                    receivers, strict=True):
            signal.connect(receiver, weak=False)
        connected = send_all()
        started = time.perf_counter()
        for i in range(calls):
            counter.inc()
            counter.inc()
            histogram.observe(0.001)
            hot.count("p", 0, key_label(f"Order:{i % 256}"))
            hot.flush()
        counting = time.perf_counter() - started
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    return (connected - bare + counting) / calls * 1e6


def main() -> None:
    messages = env_int("BENCH_METRICS_MESSAGES", 2000)
    keys = env_int("BENCH_METRICS_KEYS", 256)
    partitions = env_int("BENCH_METRICS_PARTITIONS", 4)
    processes = env_int("BENCH_METRICS_PROCESSES", 2)
    ms = env_float("BENCH_METRICS_MS", 0)
    rounds = env_int("BENCH_METRICS_ROUNDS", 3)
    every = env_float("BENCH_METRICS_SCRAPE", 1.0)
    log_dir = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/cp-bench-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    scrapes: list[float] = []
    cpu: dict[bool, list[float]] = {}
    found = interleaved({
        "without": lambda: drain(False, partitions, processes, ms, messages, keys, log_dir, every,
                                 scrapes, cpu),
        "with": lambda: drain(True, partitions, processes, ms, messages, keys, log_dir, every,
                              scrapes, cpu),
    }, rounds)
    table = Table(f"Drain with and without --metrics-port: {messages:,} messages over {keys} keys, "
                  f"{partitions} partitions on {processes} processes, {ms:g} ms tasks, scrape every "
                  f"{every:g} s, {rounds} rounds ({machine()})",
                  ["variant", "drain s (median)", "msg/s (median)", "runs s",
                   "worker CPU µs/msg (median)", "runs CPU µs/msg"])
    for name in ("without", "with"):
        median = statistics.median(found[name])
        spent = statistics.median(cpu[name == "with"]) / messages * 1e6
        table.add(name, f"{median:.2f}", f"{messages / median:,.0f}",
                  ", ".join(f"{s:.2f}" for s in found[name]), f"{spent:,.0f}",
                  ", ".join(f"{c / messages * 1e6:,.0f}" for c in cpu[name == "with"]))
    table.print()
    ratio = statistics.median(found["with"]) / statistics.median(found["without"])
    scrape = f"{statistics.median(scrapes) * 1000:.0f} ms" if scrapes else "none"
    cpu_ratio = statistics.median(cpu[True]) / statistics.median(cpu[False])
    print(f"drain time ratio with/without: {ratio:.3f}; worker CPU ratio: {cpu_ratio:.3f} "
          f"(goal <= 1.03); {len(scrapes)} scrapes during drains, median {scrape}")
    per_message = counting_cost()
    without_cpu = statistics.median(cpu[False]) / messages * 1e6
    print(f"in-process cost of the counting per message: {per_message:.1f} µs = "
          f"{per_message / without_cpu:.1%} of the {without_cpu:,.0f} µs of worker CPU a message "
          "takes without metrics")


if __name__ == "__main__":
    main()
