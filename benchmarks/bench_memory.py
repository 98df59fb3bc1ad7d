"""Memory and start-up: partition workers (a thread per partition) vs a plain prefork worker.

Same app (``benchmarks.bench_app``), same Redis, same run. For each case the whole command is
started, the clock runs until every partition consumes (its "consuming" log line; for the
plain worker: ``celery@... ready``), and then the proportional set size (PSS: shared pages
divided among the processes sharing them) of every process of the command is added up,
supervisor included.

* ``plain -c 2``                  - ``celery worker -c 2`` (prefork: a parent and 2 children)
* ``26 partitions, --processes 2`` - the default pools' size, on 2 processes (the default on
                                     2 CPUs)
* ``256 partitions, --processes 1``

Goals: 26 partitions at most 1.5x the plain worker's PSS and consuming within 2 s; 256
partitions in one process at most 3x.

    python -m benchmarks.bench_memory      # BENCH_MEMORY_CASES=26:2,256:1
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from benchmarks.bench_drain import ROOT, _celery, _start, _stop
from benchmarks.common import Table, bench_namespace, delete_namespace, machine, redis_url

__all__ = ["main", "measure"]

STARTUP_TIMEOUT = 120.0


def _pss(pid: int) -> int:
    """PSS of a process and all its descendants (bytes)."""
    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                continue
    except psutil.Error:
        return 0
    return total


def measure(label: str, argv: list[str], partitions: int, ready: str, expect: int,
            log_dir: Path) -> tuple[str, float, float]:
    """Start ``argv``, wait for ``expect`` lines containing ``ready`` in its log; return
    (label, seconds to ready, PSS MiB)."""
    url = redis_url()
    ns = bench_namespace(f"mem{partitions}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_BROKER": url, "BENCH_NS": ns,
           "BENCH_PARTITIONS": str(partitions)}
    log = log_dir / f"{label.replace(' ', '_').replace(',', '')}.log"
    log.write_bytes(b"")
    started = time.monotonic()
    proc = _start(argv, env, log)
    try:
        while log.read_text(errors="replace").count(ready) < expect:
            if time.monotonic() - started > STARTUP_TIMEOUT or proc.poll() is not None:
                raise RuntimeError(f"{label}: not ready; see {log}")
            time.sleep(0.02)
        seconds = time.monotonic() - started
        time.sleep(1.0)  # let start-up garbage settle the same way for every case
        return label, seconds, _pss(proc.pid) / 2**20
    finally:
        _stop([proc])
        delete_namespace(url, ns)


def main() -> None:
    log_dir = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/cp-bench-memory"))
    log_dir.mkdir(parents=True, exist_ok=True)
    cases = [tuple(int(x) for x in c.split(":")) for c in
             os.environ.get("BENCH_MEMORY_CASES", "26:2,256:1").split(",") if c.strip()]
    celery = _celery()
    rows = [measure("plain -c 2", [celery, "-A", "benchmarks.bench_app", "worker", "-c", "2",
                                   "-P", "prefork", "-l", "info", "--without-gossip",
                                   "--without-mingle"], 1, " ready.", 1, log_dir)]
    for partitions, processes in cases:
        rows.append(measure(
            f"{partitions} partitions, --processes {processes}",
            [celery, "-A", "benchmarks.bench_app", "partitioning", "worker", "-l", "info",
             "--processes", str(processes)], partitions, " consuming ", partitions, log_dir))
    base = rows[0][2]
    table = Table(f"Memory and start-up ({machine()})",
                  ["command", "ready after s", "PSS MiB", "PSS / plain -c 2"])
    for label, seconds, pss in rows:
        table.add(label, f"{seconds:.2f}", f"{pss:.1f}", f"{pss / base:.2f}x")
    table.print()


if __name__ == "__main__":
    main()
