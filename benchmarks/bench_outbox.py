"""The transactional outbox vs ``apply_async`` after commit: commit-to-publish latency and throughput.

Both variants run the same transactions (one row written, ``BENCH_OUTBOX_PER_TXN`` calls of a
partitioned task per transaction) on PostgreSQL (a fresh database on the local socket) or
SQLite (``BENCH_OUTBOX_DB=sqlite``), against the same Redis broker:

* ``apply_async after commit`` - the calls are published right after ``atomic()`` returns
  (what ``transaction.on_commit(task.delay)`` does; loses them if the process dies there);
* ``outbox``                   - ``outbox.publish_many`` inside the transaction; a relay
  (``Relay``, in a thread of this process, lease in Redis) publishes them after the commit.

Latency is from the end of the commit to the broker's reply to the message's publish (for
the outbox: the relay's ``publish`` returning), per message; throughput is messages over the
time from the first commit to the last publish.

    python -m benchmarks.bench_outbox
    BENCH_OUTBOX_TXNS=1000 BENCH_OUTBOX_PER_TXN=1,5 BENCH_OUTBOX_DB=postgresql|sqlite
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


def run(transactions: int, per_txn_list: list[int]) -> Table:
    import django
    from celery import Celery
    from django.conf import settings

    import celery_partitioning as cp

    table = Table(f"Outbox vs apply_async after commit ({machine()})",
                  ["variant", "events/txn", "messages", "latency p50 ms", "latency p99 ms",
                   "messages/s"])
    with _database() as database, namespace_for("outbox") as ns:
        if not settings.configured:
            settings.configure(INSTALLED_APPS=["celery_partitioning.contrib.django"],
                               DATABASES={"default": database}, USE_TZ=True,
                               DEFAULT_AUTO_FIELD="django.db.models.BigAutoField")
            django.setup()
        from django.core.management import call_command
        from django.db import connection, transaction

        from celery_partitioning.contrib.django import outbox
        from celery_partitioning.contrib.django.relay import Relay

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
        row_id = iter(range(1, 10**9))

        def one_txn(per_txn: int, use_outbox: bool) -> tuple[list[str], float]:
            sigs = [on_event.s(order_id=f"ord-{i % 50}", n=i) for i in range(per_txn)]
            with transaction.atomic():
                with connection.cursor() as cur:
                    cur.execute("INSERT INTO bench_rows (id, note) VALUES (%s, 'x')",
                                [next(row_id)])
                ids = [r.id for r in outbox.publish_many(sigs)] if use_outbox else []
            committed = time.perf_counter()
            if not use_outbox:
                ids = [sig.apply_async().id for sig in sigs]
            return ids, committed

        for per_txn in per_txn_list:
            # apply_async after commit: the publish returns in this thread
            latencies: list[float] = []
            start = time.perf_counter()
            for _ in range(transactions):
                ids, committed = one_txn(per_txn, False)
                latencies += [time.perf_counter() - committed] * len(ids)
            elapsed = time.perf_counter() - start
            table.add("apply_async after commit", per_txn, len(latencies),
                      statistics.median(latencies) * 1000, _percentile(latencies, 0.99) * 1000,
                      len(latencies) / elapsed)
            # outbox: the relay thread records when each message's publish returned
            published: dict[str, float] = {}
            relay = Relay(app, batch=500, poll=0.05)
            publish_one = relay._publish

            def timed(producer: Any, row: Any, publish_one: Any = publish_one,
                      published: dict[str, float] = published) -> None:
                publish_one(producer, row)
                published[row.task_id] = time.perf_counter()

            relay._publish = timed  # type: ignore[method-assign]
            thread = threading.Thread(target=relay.run, daemon=True)
            thread.start()
            time.sleep(0.5)  # lease taken, LISTEN set up
            commits: dict[str, float] = {}
            start = time.perf_counter()
            for _ in range(transactions):
                ids, committed = one_txn(per_txn, True)
                commits.update(dict.fromkeys(ids, committed))
            deadline = time.monotonic() + 120
            while len(published) < len(commits) and time.monotonic() < deadline:
                time.sleep(0.01)
            elapsed = max(published.values()) - start
            relay.stop.set()
            thread.join(30)
            outbox_lat = [published[i] - commits[i] for i in commits if i in published]
            table.add("outbox (relay thread)", per_txn, len(outbox_lat),
                      statistics.median(outbox_lat) * 1000, _percentile(outbox_lat, 0.99) * 1000,
                      len(outbox_lat) / elapsed)
    return table


def main() -> None:
    table = run(env_int("BENCH_OUTBOX_TXNS", 1000), env_list("BENCH_OUTBOX_PER_TXN", [1, 5]))
    table.print()


if __name__ == "__main__":
    main()
