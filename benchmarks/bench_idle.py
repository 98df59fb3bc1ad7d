"""Idle cost: Redis commands per second and connections of N idle partitions in one process.

A private ``redis-server`` (``EmbeddedRedis(always_start=True)``: nothing else talks to it)
serves as broker and store. ``celery partitioning worker --processes 1`` starts with N
partitions on empty queues; once every partition consumes (its "consuming" log line) and a
settle pause has passed, the benchmark reads ``INFO commandstats`` and ``INFO clients``
twice, ``BENCH_IDLE_SECONDS`` apart, and reports the commands per second (by command) and
the connected clients, its own connection taken off, per partition; then how long the warm stop
(SIGTERM to the whole command, until it exited) took.

Goals (issue 23): at most 1.5 idle commands per partition per second and at most 2
connections per partition, at 26 and 256 partitions.

    python -m benchmarks.bench_idle      # BENCH_IDLE_CASES=26,256 BENCH_IDLE_SECONDS=10
                                         # BENCH_IDLE_SETTLE=5
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import redis

from benchmarks.bench_drain import ROOT, _celery, _start, _stop
from benchmarks.common import Table, env_float, env_list, machine
from celery_partitioning.embedded import EmbeddedRedis

__all__ = ["main", "measure"]

STARTUP_TIMEOUT = 180.0


def _commands(client: redis.Redis) -> Counter[str]:
    """Calls so far, by command (``INFO commandstats``; the commands a script runs count too,
    as they do in ``total_commands_processed``)."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(value["calls"])
                    for name, value in stats.items()})


def measure(url: str, partitions: int, seconds: float, settle: float,
            log_dir: Path) -> tuple[float, int, Counter[str], float]:
    """Start N idle partitions in one process; return (commands/s, clients, commands/s by
    command) over ``seconds``, and the seconds its warm stop (SIGTERM) took."""
    ns = f"cpbench-idle{partitions}:"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_BROKER": url, "BENCH_NS": ns,
           "BENCH_PARTITIONS": str(partitions)}
    log = log_dir / f"idle_{partitions}.log"
    log.write_bytes(b"")
    argv = [_celery(), "-A", "benchmarks.bench_app", "partitioning", "worker", "-l", "info",
            "--processes", "1"]
    client = redis.Redis.from_url(url)
    started = time.monotonic()
    proc = _start(argv, env, log)
    try:
        while log.read_text(errors="replace").count(" consuming ") < partitions:
            if time.monotonic() - started > STARTUP_TIMEOUT or proc.poll() is not None:
                raise RuntimeError(f"{partitions} partitions: not consuming; see {log}")
            time.sleep(0.1)
        time.sleep(settle)
        before = _commands(client)
        began = time.monotonic()
        time.sleep(seconds)
        after = _commands(client)
        elapsed = time.monotonic() - began
        clients = int(client.info("clients")["connected_clients"]) - 1  # less our own
        # INFO itself is counted: the benchmark's own calls are not the worker's
        after["info"] -= 2
        rates = Counter({name: (after[name] - before[name]) / elapsed for name in after
                         if after[name] > before[name]})
        stopping = time.monotonic()
        _stop([proc])
        return sum(rates.values()), clients, rates, time.monotonic() - stopping
    finally:
        _stop([proc])
        client.flushdb()
        client.close()


def main() -> None:
    log_dir = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/cp-bench-idle"))
    log_dir.mkdir(parents=True, exist_ok=True)
    seconds = env_float("BENCH_IDLE_SECONDS", 10.0)
    settle = env_float("BENCH_IDLE_SETTLE", 5.0)
    table = Table(f"Idle cost, one process ({machine()})",
                  ["partitions", "commands/s", "per partition", "clients", "per partition",
                   "warm stop s", "commands/s by command"])
    with EmbeddedRedis("redis://127.0.0.1:1/0", always_start=True) as url:
        for partitions in env_list("BENCH_IDLE_CASES", [26, 256]):
            rate, clients, rates, stop = measure(url, partitions, seconds, settle, log_dir)
            top = ", ".join(f"{name} {value:.1f}" for name, value in rates.most_common(8))
            table.add(str(partitions), f"{rate:.0f}", f"{rate / partitions:.2f}", str(clients),
                      f"{clients / partitions:.2f}", f"{stop:.1f}", top)
    table.print()


if __name__ == "__main__":
    main()
