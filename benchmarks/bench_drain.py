"""Drain time and memory: N partition workers vs N plain solo workers on one queue, same run, same Redis.

For each N and task duration, the same M messages (over K keys) are drained twice:

* ``plain``       - N ``celery worker -P solo -c 1 --prefetch-multiplier 1`` on one queue
                    (acks_late, reject_on_worker_lost, rate limits off: what partition workers use);
* ``partitioned`` - ``celery partitioning worker`` over a pool of N partitions (lease, crash
                    recovery, misroute guard, parking gate, in-place retry machinery all on).

Messages are published before the workers start; every worker's first task waits for a
"go" key, so the clock runs from "all N workers hold a message" to "the last task ended".
Goal: partitioned / plain <= 1.10. Per-key FIFO has a cost plain Celery does not pay: a
partition's keys run on it alone, so the busiest partition (hash imbalance) bounds the
drain; the table shows that bound beside the measurement. After each drain the resident
memory (RSS, and USS: memory unique to the process) of every worker is read.

Then the thread runtime (:func:`runtime`): 26 partitions as threads of 2 processes against a
process per partition (2 ms tasks) and against 2 plain solo workers (no-op tasks).

    python -m benchmarks.bench_drain   # BENCH_DRAIN_MESSAGES=1000 BENCH_DRAIN_WORKERS=1,2,4,8
                                       # BENCH_DRAIN_MS=0,2 BENCH_DRAIN_KEYS=256
                                       # BENCH_DRAIN_PARTITIONS=26 BENCH_DRAIN_PROCESSES=2
                                       # BENCH_DRAIN_ROUNDS=3 BENCH_DRAIN_RUNTIME_ONLY=1
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from benchmarks.bench_app import PARTITIONED_TASK, PLAIN_TASK, make_app, plain_queue
from benchmarks.common import Table, bench_namespace, delete_namespace, env_int, env_list, machine, redis_url
from celery_partitioning import partition_for

__all__ = ["Run", "drain", "main"]

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 20.0


@dataclass
class Run:
    variant: str
    workers: int
    ms: float
    messages: int
    seconds: float
    busiest_share: float = 0.0
    worker_rss: list[int] = field(default_factory=list)
    worker_uss: list[int] = field(default_factory=list)
    supervisor_rss: int = 0
    #: Redis commands the drain cost, by command (INFO commandstats delta).
    commands: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def _celery() -> str:
    candidate = Path(sys.executable).with_name("celery")
    return str(candidate) if candidate.exists() else "celery"


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - closed by the child's exit; the parent keeps no handle
    try:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        out.close()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _memory(pids: list[int]) -> tuple[list[int], list[int]]:
    rss, uss = [], []
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss.append(info.rss)
        uss.append(info.uss)
    return rss, uss


def drain(variant: str, workers: int, ms: float, messages: int, keys: int, log_dir: Path,
          url: str | None = None, processes: int | None = None) -> Run:
    """Drain ``messages`` with ``workers`` plain solo workers or a pool of ``workers``
    partitions (on ``processes`` processes: the command's default when None)."""
    url = url or redis_url()
    ns = bench_namespace(f"drain{workers}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_BROKER": url, "BENCH_NS": ns,
           "BENCH_PARTITIONS": str(workers)}
    app = make_app(url, ns, workers)
    client = redis.Redis.from_url(url)
    procs: list[subprocess.Popen[bytes]] = []
    names = [f"Order:{i}" for i in range(keys)]
    load = Counter(partition_for(names[i % keys], workers) for i in range(messages))
    try:
        task = app.tasks[PARTITIONED_TASK if variant == "partitioned" else PLAIN_TASK]
        with app.producer_or_acquire() as producer:
            for i in range(messages):
                task.apply_async((names[i % keys],), {"ms": ms}, producer=producer)
        log = log_dir / f"{variant}-{workers}-{processes}-{ms:g}ms.log"
        if variant == "partitioned":
            spread = [] if processes is None else ["--processes", str(processes)]
            procs.append(_start([_celery(), "-A", "benchmarks.bench_app", "partitioning", "worker",
                                 "-l", "warning", "--stop-timeout", str(STOP_TIMEOUT), *spread],
                                env, log))
            expected_ready = len(load)
        else:
            for i in range(workers):
                procs.append(_start([_celery(), "-A", "benchmarks.bench_app", "worker", "-Q", plain_queue(ns),
                                     "-P", "solo", "-c", "1", "--prefetch-multiplier", "1",
                                     "--without-gossip", "--without-mingle", "--without-heartbeat",
                                     "-n", f"plain{i}@%h", "-l", "warning"], env, log))
            expected_ready = workers
        deadline = time.monotonic() + READY_TIMEOUT
        while client.scard(f"{ns}ready") < expected_ready:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{variant} x{workers}: workers did not get ready; see {log}")
            time.sleep(0.05)
        before = _commandstats(client)
        start = time.time()
        client.set(f"{ns}go", "1")
        deadline = time.monotonic() + max(120.0, messages * (ms + 20) / 1000)
        while int(client.get(f"{ns}done") or 0) < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant} x{workers}: drain timed out; see {log}")
            time.sleep(0.02)
        seconds = float(client.get(f"{ns}last") or 0) - start
        commands = _commandstats(client) - before
        if variant == "partitioned":
            supervisor = psutil.Process(procs[0].pid)
            worker_pids = [c.pid for c in supervisor.children()]
            supervisor_rss = supervisor.memory_info().rss
        else:
            worker_pids, supervisor_rss = [p.pid for p in procs], 0
        rss, uss = _memory(worker_pids)
        return Run(variant, workers, ms, messages, seconds, max(load.values()) / messages,
                   rss, uss, supervisor_rss, commands)
    finally:
        _stop(procs)
        client.close()
        app.close()
        delete_namespace(url, ns)


def _commandstats(client: redis.Redis) -> Counter[str]:
    """Calls per Redis command so far (the benchmark's own polling included, alike in both)."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()})


def _private_redis(log_dir: Path) -> tuple[str, subprocess.Popen[bytes]] | None:
    """A redis-server of our own (no persistence), so command counts are ours alone."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    if binary is None or os.environ.get("BENCH_DRAIN_PRIVATE_REDIS", "1") != "1":
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(log_dir)], dict(os.environ), log_dir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                return url, proc
        except redis.RedisError:
            time.sleep(0.1)
    _stop([proc])
    raise RuntimeError("the private redis-server did not answer")


def _difference(plain: Counter[str], part: Counter[str], messages: int) -> str:
    """Commands per message the partition workers make more (+) or fewer (-) than plain ones."""
    diffs = {name: (part[name] - plain[name]) / messages for name in set(plain) | set(part)}
    shown = sorted(((d, name) for name, d in diffs.items() if abs(d) >= 0.05),
                   key=lambda item: (-item[0], item[1]))
    return ", ".join(f"{name} {d:+.2f}" for d, name in shown) or "none"


def _mib(values: list[int]) -> float:
    return statistics.mean(values) / 2**20 if values else float("nan")


def main() -> None:
    messages = env_int("BENCH_DRAIN_MESSAGES", 1000)
    keys = env_int("BENCH_DRAIN_KEYS", 256)
    worker_counts = env_list("BENCH_DRAIN_WORKERS", [1, 2, 4, 8])
    durations = env_list("BENCH_DRAIN_MS", [0, 2])
    log_dir = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/cp-bench-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    drains = Table(f"Drain time, {messages:,} messages over {keys} keys, Redis ({machine()})",
                   ["task", "N", "plain s", "partitioned s", "ratio", "plain msg/s", "partitioned msg/s",
                    "busiest partition share", "ratio bound from imbalance"])
    memory = Table("Resident memory per worker after the drain (mean over the N workers)",
                   ["task", "N", "plain RSS MiB", "partition RSS MiB", "RSS ratio", "plain USS MiB",
                    "partition USS MiB", "USS ratio", "supervisor RSS MiB"])
    commands = Table("Redis commands per message during the drain (INFO commandstats of a private "
                     "redis-server; the benchmark task's own 3 and the poller's included in both)",
                     ["task", "N", "plain", "partitioned", "extra per message", "more (+) / fewer (-)"])
    private = _private_redis(log_dir)
    url = private[0] if private else None
    only_runtime = os.environ.get("BENCH_DRAIN_RUNTIME_ONLY") == "1"
    try:
        if not only_runtime:
            _matrix(durations, worker_counts, messages, keys, log_dir, url, drains, memory, commands)
        threads = runtime(messages, keys, log_dir, url)
    finally:
        if private:
            _stop([private[1]])
    if not only_runtime:
        drains.print()
        memory.print()
        if private:
            commands.print()
    threads.print()


def runtime(messages: int, keys: int, log_dir: Path, url: str | None) -> Table:
    """The thread runtime against a process per partition and against plain solo workers.

    * 26 partitions, 2 ms (I/O-bound) tasks: ``--processes 2`` (a thread per partition)
      against ``--processes 26`` (a process per partition, as before threads);
    * 26 partitions, no-op (CPU-bound) tasks, ``--processes 2`` against 2 plain solo workers.

    ``BENCH_DRAIN_ROUNDS`` interleaved rounds (default 3); the median ratio is the result.
    """
    partitions = env_int("BENCH_DRAIN_PARTITIONS", 26)
    processes = env_int("BENCH_DRAIN_PROCESSES", 2)
    rounds = env_int("BENCH_DRAIN_ROUNDS", 3)
    table = Table(f"Thread runtime, {partitions} partitions, {messages:,} messages over {keys} keys "
                  f"({machine()})", ["task", "compared", "round", "baseline s", "threads s", "ratio"])
    def threads(ms: float) -> Run:
        return drain("partitioned", partitions, ms, messages, keys, log_dir, url, processes)

    def baseline(ms: float) -> Run:
        if ms:  # a process per partition
            return drain("partitioned", partitions, ms, messages, keys, log_dir, url, partitions)
        return drain("plain", processes, ms, messages, keys, log_dir, url)

    for ms in (2.0, 0.0):
        label = "no-op" if not ms else f"{ms:g} ms"
        compared = (f"--processes {processes} / --processes {partitions}" if ms else
                    f"--processes {processes} / {processes} plain solo workers")
        ratios = []
        for i in range(rounds):
            if i % 2:  # interleave: neither side always runs first
                mine, base = threads(ms), baseline(ms)
            else:
                base, mine = baseline(ms), threads(ms)
            ratios.append(mine.seconds / base.seconds)
            table.add(label, compared, i + 1, base.seconds, mine.seconds, ratios[-1])
            sys.stdout.write(f"  {label} {compared}, round {i + 1}: {ratios[-1]:.2f}\n")
            sys.stdout.flush()
        table.add(label, compared, "median", "", "", statistics.median(ratios))
    return table


def _matrix(durations: list[int], worker_counts: list[int], messages: int, keys: int, log_dir: Path,
            url: str | None, drains: Table, memory: Table, commands: Table) -> None:
    for ms in durations:
        for n in worker_counts:
            order = ["plain", "partitioned"] if n % 2 else ["partitioned", "plain"]
            runs = {v: drain(v, n, ms, messages, keys, log_dir, url) for v in order}
            plain, part = runs["plain"], runs["partitioned"]
            label = "no-op" if not ms else f"{ms:g} ms"
            drains.add(label, n, plain.seconds, part.seconds, part.seconds / plain.seconds, plain.rate,
                       part.rate, f"{part.busiest_share:.1%}", part.busiest_share * n)
            memory.add(label, n, _mib(plain.worker_rss), _mib(part.worker_rss),
                       _mib(part.worker_rss) / _mib(plain.worker_rss), _mib(plain.worker_uss),
                       _mib(part.worker_uss), _mib(part.worker_uss) / _mib(plain.worker_uss),
                       part.supervisor_rss / 2**20)
            commands.add(label, n, sum(plain.commands.values()) / messages,
                         sum(part.commands.values()) / messages,
                         (sum(part.commands.values()) - sum(plain.commands.values())) / messages,
                         _difference(plain.commands, part.commands, messages))
            sys.stdout.write(f"  {label} N={n}: plain {plain.seconds:.2f}s, "
                             f"partitioned {part.seconds:.2f}s\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
