"""Driving ``celery partitioning worker`` processes over tests.apps.ordering_app in tests."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from tests.apps.ordering_app import make_app
from tests.support.procs import Processes, celery_bin, wait_for

#: ``ms`` for a signalled task the test will SIGKILL: its first run holds this long, so the
#: kill lands inside it however slowly a loaded machine lets the test react.
HOLD_MS = 30_000

#: One message to publish: key, seq, task milliseconds, signal list name (or None).
Event = tuple[str, int, int, str | None]


def keyed_events(keys: int, total: int, ms: int, seed: int = 7) -> tuple[list[Event], dict[str, int]]:
    """``total`` events over ``keys`` keys in a shuffled interleaving, numbered per key."""
    rng = random.Random(seed)
    names = [f"Order:{i}" for i in range(keys)]
    counts: dict[str, int] = {}
    events: list[Event] = []
    for i in range(total):
        key = names[i] if i < keys else rng.choice(names)
        seq = counts.get(key, 0)
        counts[key] = seq + 1
        events.append((key, seq, ms, None))
    return events, counts


@dataclass
class Harness:
    broker: str
    store: str
    ns: str
    partitions: int
    tmp: Path
    processes: Processes
    lease_ttl: float = 2.0
    _apps: dict[int, Celery] = field(default_factory=dict)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.store)

    def env(self, partitions: int | None = None) -> dict[str, str]:
        return {"CPW_BROKER": self.broker, "CPW_REDIS": self.store, "CPW_NS": self.ns,
                "CPW_PARTITIONS": str(partitions or self.partitions),
                "CPW_LEASE_TTL": str(self.lease_ttl)}

    def app(self, partitions: int | None = None) -> Celery:
        n = partitions or self.partitions
        if n not in self._apps:
            self._apps[n] = make_app(self.broker, self.store, self.ns, n, self.lease_ttl)
        return self._apps[n]

    def cli(self, *args: str, partitions: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        import os

        from tests.support.procs import ROOT

        return subprocess.run([celery_bin(), "-A", "tests.apps.ordering_app", "partitioning", *args],
                              env={**os.environ, "PYTHONPATH": str(ROOT), **self.env(partitions)},
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def start_workers(self, name: str, *args: str, partitions: int | None = None) -> subprocess.Popen[bytes]:
        return self.processes.start(
            [celery_bin(), "-A", "tests.apps.ordering_app", "partitioning", "worker", "-l", "info",
             "--stop-timeout", "30", *args],
            env=self.env(partitions), log=self.log(name))

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def log_text(self, name: str) -> str:
        path = self.log(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def publish(self, events: Iterable[Event], partitions: int | None = None) -> None:
        app = self.app(partitions)
        task = app.tasks["ordering.record"]
        with app.producer_or_acquire() as producer:
            for key, seq, ms, signal in events:
                task.apply_async((key, seq), {"ms": ms, "signal": signal}, producer=producer)

    def done(self) -> int:
        return int(self.redis.get(f"{self.ns}done") or 0)

    def wait_done(self, count: int, timeout: float, logs: Sequence[str] = ()) -> None:
        try:
            wait_for(lambda: self.done() >= count, timeout, f"{count} tasks done")
        except AssertionError as exc:
            tails = "\n".join(f"--- {n}\n" + self.log_text(n)[-3000:] for n in logs)
            raise AssertionError(f"{exc} (done: {self.done()})\n{tails}") from None

    def release(self, key: str, seq: int) -> None:
        """End the hold of a task published with a signal (it finishes at once)."""
        self.redis.set(f"{self.ns}release:{key}:{seq}", "1", ex=300)

    def records(self, keys: Iterable[str]) -> dict[str, list[str]]:
        client = self.redis
        return {k: [e.decode() for e in client.lrange(f"{self.ns}rec:{k}", 0, -1)] for k in keys}

    def partition_log(self, label: str) -> list[tuple[str, int, str, int]]:
        out = []
        for raw in self.redis.lrange(f"{self.ns}part:{label}", 0, -1):
            kind, pid, key, seq = raw.decode().split(" ")
            out.append((kind, int(pid), key, int(seq)))
        return out

    def next_signal(self, name: str, timeout: float = 60) -> tuple[int, str, str, int]:
        client, deadline = self.redis, time.monotonic() + timeout
        got = None
        while got is None and time.monotonic() < deadline:
            got = client.blpop([f"{self.ns}{name}"], timeout=1)  # short: blocking reads time out here
        assert got is not None, f"no task signalled {name!r} within {timeout}s"
        pid, label, key, seq = got[1].decode().split(" ")
        return int(pid), label, key, int(seq)


def rerun_in_place(records: Sequence[str], seq: int) -> bool:
    """True when ``start seq`` is directly followed by ``start seq`` (killed, then re-run first)."""
    return any(records[i] == f"start {seq}" and records[i + 1] == f"start {seq}"
               for i in range(len(records) - 1))


def delete_amqp_queues(url: str, names: Iterable[str]) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        for name in names:
            channel = conn.channel()
            try:
                channel.queue_delete(queue=name)
            except Exception:
                pass
            finally:
                try:
                    channel.close()
                except Exception:
                    pass

