"""A Django-backed app for the checkpoint tests: read-modify-write totals, with and without a checkpoint.

Environment: ``CP_REDIS_URL`` (broker), ``CP_NS`` (key prefix), ``CP_DB`` (SQLite file, WAL),
or ``CP_PG_DB`` (a PostgreSQL database name on the local socket, trust auth) instead.
``add_checked`` keeps its checkpoint in the same transaction as the total; ``add_plain`` is
the same body without one. Both run on the single partition of pool ``entity``.

Kill protocol (``CP_BLOCK_AT``: comma-separated ``seq`` values): after a message with such a
``seq`` has run and committed, and before it is acked (``task_postrun``), the worker writes
its pid to ``<ns>blocked:<task id>`` once per message and waits (at most 60 s) for the test
to SIGKILL it. The message then runs again.
"""

from __future__ import annotations

import os
import time
from typing import Any

import django
from celery import Celery, signals
from django.conf import settings

import celery_partitioning as cp

REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
NS = os.environ.get("CP_NS", "cpcheck:")
DB = os.environ.get("CP_DB", "/tmp/cp-checkpoints.sqlite3")
PG_DB = os.environ.get("CP_PG_DB", "")
BLOCK_AT = {int(s) for s in os.environ.get("CP_BLOCK_AT", "").split(",") if s.strip()}

_SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": DB,
           "OPTIONS": {"timeout": 60, "transaction_mode": "IMMEDIATE",
                       "init_command": "PRAGMA journal_mode=WAL;"}}
_POSTGRES = {"ENGINE": "django.db.backends.postgresql", "NAME": PG_DB,
             "HOST": os.environ.get("CP_PG_HOST", "/var/run/postgresql"), "USER": "postgres"}

if not settings.configured:
    settings.configure(
        INSTALLED_APPS=["celery_partitioning.contrib.django"],
        DATABASES={"default": _POSTGRES if PG_DB else _SQLITE},
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()

app = Celery("checkpoint_app", broker=REDIS_URL, set_as_current=True)
app.conf.update(
    broker_transport_options={"global_keyprefix": NS},
    partitioning_pools={"entity": 1},
    partitioning_queue_prefix=f"{NS.rstrip(':')}.p",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)
cp.install(app)

ACCOUNT = cp.create_entity_partition_key("Account", field="account")


def create_tables() -> None:
    """The checkpoint table (migrate) and the totals table the tasks write."""
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0, interactive=False)
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS totals (account TEXT PRIMARY KEY, total INTEGER, "
                    "runs INTEGER)")
        serial = "SERIAL" if connection.vendor == "postgresql" else "INTEGER"
        cur.execute(f"CREATE TABLE IF NOT EXISTS applied (id {serial} PRIMARY KEY, "
                    "projection TEXT, mark TEXT)")


def add_to_total(account: str, amount: int) -> None:
    """Read, compute, write: correct once per event, wrong when an event is applied twice."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT total, runs FROM totals WHERE account = %s", [account])
        row = cur.fetchone()
        total, runs = (0, 0) if row is None else row
        cur.execute("INSERT INTO totals (account, total, runs) VALUES (%s, %s, %s) "
                    "ON CONFLICT(account) DO UPDATE SET total = excluded.total, runs = excluded.runs",
                    [account, total + amount, runs + 1])


def total_of(account: str) -> int | None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT total FROM totals WHERE account = %s", [account])
        row = cur.fetchone()
    return None if row is None else int(row[0])


@app.task(name="cp.add_checked")
@cp.projection("totals", key=ACCOUNT, pool="entity", checkpoint="seq")
def add_checked(account: str, amount: int, seq: int) -> None:
    add_to_total(account, amount)


@app.task(name="cp.add_plain")
@cp.partitioned(ACCOUNT, pool="entity")
def add_plain(account: str, amount: int, seq: int) -> None:
    add_to_total(account, amount)


@app.task(name="cp.add_by_id")
@cp.projection("totalsById", key=ACCOUNT, pool="entity", checkpoint=cp.MESSAGE_ID)
def add_by_id(account: str, amount: int, seq: int) -> None:
    add_to_total(account, amount)


def _block_before_ack(sender: Any = None, task_id: str | None = None, kwargs: Any = None,
                      **_: Any) -> None:
    if not BLOCK_AT or not kwargs or kwargs.get("seq") not in BLOCK_AT:
        return
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        if not client.set(f"{NS}blocked:{task_id}", os.getpid(), nx=True):
            return  # the second run of a message whose first run was killed: ack it
    finally:
        client.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the test SIGKILLs this process meanwhile
        time.sleep(0.05)


signals.task_postrun.connect(_block_before_ack, weak=False)
