"""The transactional outbox vs ``apply_async`` after commit: commit-to-publish latency and throughput.

Every variant runs on PostgreSQL (a fresh database on the local socket) or SQLite
(``BENCH_OUTBOX_DB=sqlite``), against the same Redis broker, in one run:

* ``apply_async after commit`` - transactions of one row and ``BENCH_OUTBOX_PER_TXN`` calls
  of a partitioned task, each call published with ``apply_async`` right after ``atomic()``
  returns (what ``transaction.on_commit(task.delay)`` does; lost if the process dies there);
* ``outbox (relay thread)``    - the same transactions with ``outbox.publish_many`` inside; a
  relay (``Relay``, a thread of this process, lease in Redis) publishes them after the commit.
  Latency: from the end of the commit to the return of the relay round's broker round trip.
* ``relay drain``              - ``BENCH_OUTBOX_BACKLOG`` committed outbox rows, then a relay
  started: messages/s from its start until the outbox is empty (the relay's own throughput,
  not bounded by how fast one producer commits), and its ratio to the ``apply_async`` loop.

Throughput of the first two: messages over the time from the first commit to the last publish.

    python -m benchmarks.bench_outbox
    BENCH_OUTBOX_TXNS=1000 BENCH_OUTBOX_PER_TXN=1,5 BENCH_OUTBOX_BACKLOG=20000
    BENCH_OUTBOX_BATCH=500 BENCH_OUTBOX_DB=postgresql|sqlite
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.common import Table, env_int, env_list, machine, namespace_for, redis_url

__all__ = ["run", "main"]

PG_HOST = os.environ.get("CP_PG_HOST", "/var/run/postgresql")


@contextmanager
def _database() -> Iterator[dict[str, Any]]:
    """Django DATABASES["default"]: a fresh PostgreSQL database, or a SQLite file."""
    if os.environ.get("BENCH_OUTBOX_DB", "postgresql") == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield {"ENGINE": "django.db.backends.sqlite3", "NAME": f"{tmp}/bench.sqlite3",
                   "OPTIONS": {"timeout": 60, "transaction_mode": "IMMEDIATE",
                               "init_command": "PRAGMA journal_mode=WAL;"}}
        return
    import psycopg

    name = f"cp_bench_outbox_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(host=PG_HOST, user="postgres", dbname="postgres", autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield {"ENGINE": "django.db.backends.postgresql", "NAME": name, "HOST": PG_HOST,
               "USER": "postgres"}
    finally:
        from django.db import connections

        connections.close_all()
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Bench:
    """The app, the task and the transactions of one benchmark run."""

    def __init__(self, ns: str) -> None:
        from celery import Celery
        from django.core.management import call_command
        from django.db import connection

        import celery_partitioning as cp

        call_command("migrate", verbosity=0, interactive=False)
        with connection.cursor() as cur:
            cur.execute("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, note TEXT)")
        app = Celery("bench_outbox", broker=redis_url(), set_as_current=False)
        app.conf.update(broker_transport_options={"global_keyprefix": ns},
                        partitioning_pools={"entity": 4},
                        partitioning_queue_prefix=f"{ns.rstrip(':')}.p",
                        task_ignore_result=True)
        cp.install(app)

        @app.task(name="bench.outbox.on_event", shared=False)
        @cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
        def on_event(order_id: str, n: int) -> None: ...

        app.finalize()
        self.app, self.task = app, on_event
        self._row_id = iter(range(1, 10**9))

    def txn(self, per_txn: int, use_outbox: bool) -> tuple[list[str], float]:
        """One transaction (one row, ``per_txn`` calls); (task ids, end of its commit)."""
        from django.db import connection, transaction

        from celery_partitioning.contrib.django import outbox

        sigs = [self.task.s(order_id=f"ord-{i % 50}", n=i) for i in range(per_txn)]
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("INSERT INTO bench_rows (id, note) VALUES (%s, 'x')",
                            [next(self._row_id)])
            ids = [r.id for r in outbox.publish_many(sigs)] if use_outbox else []
        committed = time.perf_counter()
        if not use_outbox:
            ids = [sig.apply_async().id for sig in sigs]
        return ids, committed


@contextmanager
def _relay_thread(app: Any, batch: int) -> Iterator[dict[str, float]]:
    """A relay in a thread; yields {task id: when its round's broker round trip returned}."""
    from celery_partitioning.contrib.django import relay as relay_module

    published: dict[str, float] = {}
    real_send = relay_module.send

    def timed_send(app: Any, messages: Any, chunk: int) -> None:
        real_send(app, messages, chunk)
        now = time.perf_counter()
        published.update((m.task_id, now) for m in messages)

    relay_module.send = timed_send  # type: ignore[assignment]
    relay = relay_module.Relay(app, batch=batch, poll=0.05)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        yield published
    finally:
        relay.stop.set()
        thread.join(30)
        relay_module.send = real_send  # type: ignore[assignment]


def _wait_for(published: dict[str, float], count: int) -> None:
    deadline = time.monotonic() + 300
    while len(published) < count and time.monotonic() < deadline:
        time.sleep(0.002)


def _apply_async_loop(bench: _Bench, transactions: int, per_txn: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    start = time.perf_counter()
    for _ in range(transactions):
        ids, committed = bench.txn(per_txn, False)
        latencies += [time.perf_counter() - committed] * len(ids)
    return latencies, len(latencies) / (time.perf_counter() - start)


def _outbox_concurrent(bench: _Bench, transactions: int, per_txn: int,
                       batch: int) -> tuple[list[float], float]:
    with _relay_thread(bench.app, batch) as published:
        time.sleep(0.5)  # lease taken, LISTEN set up
        commits: dict[str, float] = {}
        start = time.perf_counter()
        for _ in range(transactions):
            ids, committed = bench.txn(per_txn, True)
            commits.update(dict.fromkeys(ids, committed))
        _wait_for(published, len(commits))
        elapsed = max(published.values()) - start
    latencies = [published[i] - commits[i] for i in commits if i in published]
    return latencies, len(latencies) / elapsed


def _relay_drain(bench: _Bench, backlog: int, batch: int) -> float:
    """Messages/s of a relay publishing ``backlog`` rows committed before it started."""
    done = 0
    while done < backlog:
        done += len(bench.txn(min(500, backlog - done), True)[0])
    with _relay_thread(bench.app, batch) as published:
        start = time.perf_counter()
        _wait_for(published, backlog)
        elapsed = max(published.values()) - start
    return len(published) / elapsed


def run(transactions: int, per_txn_list: list[int], backlog: int, batch: int) -> Table:
    import django
    from django.conf import settings

    table = Table(f"Outbox vs apply_async after commit ({machine()})",
                  ["variant", "events/txn", "messages", "latency p50 ms", "latency p99 ms",
                   "messages/s", "ratio to apply_async loop"])
    with _database() as database, namespace_for("outbox") as ns:
        if not settings.configured:
            settings.configure(INSTALLED_APPS=["celery_partitioning.contrib.django"],
                               DATABASES={"default": database}, USE_TZ=True,
                               DEFAULT_AUTO_FIELD="django.db.models.BigAutoField")
            django.setup()
        bench = _Bench(ns)
        loop_rates = []  # each ratio's base: the apply_async loop of the same size
        for per_txn in per_txn_list:
            latencies, rate = _apply_async_loop(bench, transactions, per_txn)
            loop_rate = rate
            loop_rates.append(rate)
            table.add("apply_async after commit", per_txn, len(latencies),
                      statistics.median(latencies) * 1000, _percentile(latencies, 0.99) * 1000,
                      rate, rate / loop_rate)
            latencies, rate = _outbox_concurrent(bench, transactions, per_txn, batch)
            table.add("outbox (relay thread)", per_txn, len(latencies),
                      statistics.median(latencies) * 1000, _percentile(latencies, 0.99) * 1000,
                      rate, rate / loop_rate)
        if backlog:
            rate = _relay_drain(bench, backlog, batch)
            # against the fastest apply_async loop measured above
            table.add(f"relay drain (batch {batch})", "-", backlog, "-", "-", rate,
                      rate / max(loop_rates, default=rate))
    return table


def main() -> None:
    table = run(env_int("BENCH_OUTBOX_TXNS", 1000), env_list("BENCH_OUTBOX_PER_TXN", [1, 5]),
                env_int("BENCH_OUTBOX_BACKLOG", 20000), env_int("BENCH_OUTBOX_BATCH", 500))
    table.print()


if __name__ == "__main__":
    main()
