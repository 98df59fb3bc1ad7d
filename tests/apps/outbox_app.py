"""A Django-backed app for the outbox tests: events written and published in one transaction.

Environment: ``CP_REDIS_URL`` (broker and store; ``CP_BROKER_URL`` for another broker),
``CP_NS`` (key prefix), ``CP_DB`` (SQLite
file, WAL) or ``CP_PG_DB`` (a PostgreSQL database on the local socket, trust auth).

``produce`` runs transactions that each take the next sequence number of a few keys
(``key_seq``, row-locked, so a key's numbers follow commit order), record the events and
``outbox.publish_many`` one ``apply_event`` call per event, last in the transaction; every
``rollback_every``-th transaction raises after the publish and rolls back. ``apply_event``
is a checkpointed projection (position ``seq``) that appends to ``applied``.
"""

from __future__ import annotations

import os
import random
import uuid
from typing import Any

import django
from celery import Celery
from django.conf import settings

import celery_partitioning as cp

REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
NS = os.environ.get("CP_NS", "cpoutbox:")
DB = os.environ.get("CP_DB", "/tmp/cp-outbox.sqlite3")
PG_DB = os.environ.get("CP_PG_DB", "")

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

#: ``CP_BROKER_URL`` (e.g. RabbitMQ) instead of the Redis one; the store stays on Redis.
BROKER_URL = os.environ.get("CP_BROKER_URL") or REDIS_URL

app = Celery("outbox_app", broker=BROKER_URL, set_as_current=True)
app.conf.update(
    broker_transport_options={"global_keyprefix": NS} if BROKER_URL == REDIS_URL else {},
    partitioning_redis_url=REDIS_URL,
    partitioning_pools={"entity": 4},
    partitioning_queue_prefix=f"{NS.rstrip(':')}.p",
    partitioning_lease_ttl=2,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    # CP_OUTBOX_RELAY=0: `partitioning worker` runs no outbox relay thread
    partitioning_outbox_relay=os.environ.get("CP_OUTBOX_RELAY", "1") == "1",
)
cp.install(app)

STREAM = cp.create_entity_partition_key("Stream", field="key")


class Rollback(Exception):
    """Raised inside a transaction to roll it back after its publish."""


def create_tables() -> None:
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0, interactive=False)
    serial = "SERIAL" if connection.vendor == "postgresql" else "INTEGER"
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS key_seq (key TEXT PRIMARY KEY, seq INTEGER)")
        cur.execute(f"CREATE TABLE IF NOT EXISTS events (id {serial} PRIMARY KEY, key TEXT, "
                    "seq INTEGER, event_id TEXT)")
        cur.execute(f"CREATE TABLE IF NOT EXISTS applied (id {serial} PRIMARY KEY, key TEXT, "
                    "seq INTEGER, event_id TEXT)")


@app.task(name="outbox.apply_event")
@cp.projection("events", key=STREAM, pool="entity", checkpoint="seq")
def apply_event(key: str, seq: int, event_id: str) -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("INSERT INTO applied (key, seq, event_id) VALUES (%s, %s, %s)",
                    [key, seq, event_id])


def _next_seq(key: str) -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("INSERT INTO key_seq (key, seq) VALUES (%s, 0) ON CONFLICT (key) DO NOTHING",
                    [key])
        cur.execute("UPDATE key_seq SET seq = seq + 1 WHERE key = %s RETURNING seq", [key])
        return int(cur.fetchone()[0])


def produce(transactions: int, keys: int, per_transaction: int, rollback_every: int,
            seed: int, until: str = "") -> dict[str, Any]:
    """Run ``transactions`` transactions, and more until the file ``until`` exists (when
    given); return the event ids that committed and that rolled back."""
    from django.db import connection, transaction

    from celery_partitioning.contrib.django import outbox

    rng = random.Random(seed)
    committed: list[str] = []
    rolled_back: list[str] = []
    n = 0
    while n < transactions or (until and not os.path.exists(until)):
        chosen = sorted(rng.sample([f"k{i}" for i in range(keys)], per_transaction))
        events = []
        try:
            with transaction.atomic():
                for key in chosen:  # row locks first, in key order; the outbox lock last
                    seq = _next_seq(key)
                    event_id = uuid.uuid4().hex
                    with connection.cursor() as cur:
                        cur.execute("INSERT INTO events (key, seq, event_id) VALUES (%s, %s, %s)",
                                    [key, seq, event_id])
                    events.append((key, seq, event_id))
                outbox.publish_many([apply_event.s(key=k, seq=s, event_id=e) for k, s, e in events])
                if rollback_every and (n + seed) % rollback_every == 0:
                    raise Rollback()
        except Rollback:
            rolled_back += [e for _, _, e in events]
        else:
            committed += [e for _, _, e in events]
        n += 1
    connection.close()
    return {"committed": committed, "rolled_back": rolled_back}
