"""The transactional outbox: stored in the caller's transaction as apply_async would send it,
nothing without a commit, relayed in id order with the same task id (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import ROOT
from tests.test_checkpoints import postgres_db  # noqa: F401 - the fixture

SCENARIO = textwrap.dedent("""
    import json
    import redis
    from django.db import transaction
    from kombu import Connection
    from tests.apps import outbox_app as oa
    import celery_partitioning as cp
    from celery_partitioning.contrib.django import outbox
    from celery_partitioning.contrib.django.models import OutboxMessage
    from celery_partitioning.contrib.django.relay import Relay

    oa.create_tables()
    found = {}
    # outside a transaction: an error that says so
    try:
        outbox.publish(oa.apply_event.s(key="a", seq=1, event_id="e1"))
    except cp.PartitionKeyError as exc:
        found["outside"] = str(exc)
    # a bad call: refused at the call, nothing stored, the transaction goes on
    with transaction.atomic():
        try:
            outbox.publish_many([oa.apply_event.s(key="a", seq=1, event_id="e1"),
                                 oa.apply_event.s(key="a", seq=None, event_id="e2")])
        except cp.PartitionKeyError as exc:
            found["bad"] = str(exc)
        try:  # wrong arguments: publish_many names the position
            outbox.publish_many([oa.apply_event.s(key="a", seq=1, event_id="e1"),
                                 oa.apply_event.s(key="a", seq=2)])
        except cp.PartitionKeyError as exc:
            found["bad_args"] = str(exc)
        try:  # publish raises what apply_async raises
            outbox.publish(oa.apply_event.s(key="a", seq=1, event_id=object()))
        except Exception as exc:
            found["unserializable"] = type(exc).__name__
        found["rows_after_bad"] = OutboxMessage.objects.count()
    # rolled back: nothing stored
    try:
        with transaction.atomic():
            outbox.publish(oa.apply_event.s(key="a", seq=1, event_id="rolled"))
            found["rows_inside"] = OutboxMessage.objects.count()
            raise oa.Rollback()
    except oa.Rollback:
        pass
    found["rows_after_rollback"] = OutboxMessage.objects.count()
    # committed: stored, and not on the broker until the relay runs
    route = cp.explain_route(oa.app, "outbox.apply_event", key="a", seq=2, event_id="e2")
    client = redis.Redis.from_url(oa.REDIS_URL)
    queue_key = oa.NS + route.queue
    with transaction.atomic():
        results = outbox.publish_many([oa.apply_event.s(key="a", seq=s, event_id=f"e{s}")
                                       for s in (2, 3)] +
                                      [oa.apply_event.s(key="b", seq=1, event_id="b1")])
    found["ids"] = [r.id for r in results]
    rows = list(OutboxMessage.objects.order_by("id"))
    found["rows"] = [[r.task_id, r.routing_key, r.partition_key, r.declare["name"]]
                     for r in rows]
    found["queue"] = route.queue
    found["queued_before_relay"] = client.llen(queue_key)
    # the relay publishes them in id order, with the same ids, and deletes them
    relay = Relay(oa.app, batch=2)
    found["rounds"] = [relay.relay_once(), relay.relay_once(), relay.relay_once()]
    found["rows_after_relay"] = OutboxMessage.objects.count()
    raw = [json.loads(m) for m in reversed(client.lrange(queue_key, 0, -1))]
    found["queued"] = [[m["headers"]["id"], m["headers"]["partition_key"]] for m in raw]
    # what apply_async itself sends, for comparison
    oa.apply_event.apply_async(kwargs={"key": "a", "seq": 9, "event_id": "direct"})
    direct = json.loads(client.lindex(queue_key, 0))
    found["header_names"] = [sorted(raw[0]["headers"]), sorted(direct["headers"])]
    found["props"] = [sorted(raw[0]["properties"]), sorted(direct["properties"])]
    from kombu.serialization import loads
    import base64
    found["body"] = loads(base64.b64decode(raw[0]["body"]), raw[0]["content-type"],
                          raw[0]["content-encoding"])
    print(json.dumps(found))
""")


def _run(env: dict[str, str], code: str) -> Any:
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env,
                          "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_committed_call_is_stored_as_apply_async_sends_it_and_relayed_in_order(
        database: str, redis_url: str, namespace: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace, "CP_DB": str(tmp_path / "o.sqlite3")}
    if database == "postgresql":
        env["CP_PG_DB"] = request.getfixturevalue("postgres_db")
    found = _run(env, SCENARIO)
    # Outside a transaction the call is an error that says so
    assert "inside transaction.atomic()" in found["outside"]
    # A bad call anywhere is refused at the call, naming its position; nothing is stored
    assert "outbox call 1" in found["bad"] and "seq" in found["bad"]
    assert "outbox call 1" in found["bad_args"] and "'event_id'" in found["bad_args"]
    assert found["unserializable"] == "EncodeError"
    assert found["rows_after_bad"] == 0
    # A rolled-back transaction leaves nothing behind
    assert found["rows_inside"] == 1 and found["rows_after_rollback"] == 0
    # A committed one is stored, routed as apply_async routes it, and nothing reached the broker
    assert [r[0] for r in found["rows"]] == found["ids"]
    assert [r[2] for r in found["rows"]][:2] == ["Stream:a", "Stream:a"]
    assert found["rows"][0][1] == found["rows"][0][3] == found["queue"]
    assert found["queued_before_relay"] == 0
    # The relay publishes in id order, batch by batch, with the same task ids, and deletes them
    assert found["rounds"] == [2, 1, 0]
    assert found["rows_after_relay"] == 0
    queued_a = [i for i, key in found["queued"] if key == "Stream:a"]
    assert queued_a == found["ids"][:2]
    # The message is the one apply_async sends: same headers and properties, same body
    assert found["header_names"][0] == found["header_names"][1]
    assert found["props"][0] == found["props"][1]
    assert found["body"][1] == {"key": "a", "seq": 2, "event_id": "e2"}


AMQP_SCENARIO = textwrap.dedent("""
    import json
    from django.db import transaction
    from tests.apps import outbox_app as oa
    from celery_partitioning.contrib.django import outbox
    from celery_partitioning.contrib.django.models import OutboxMessage
    from celery_partitioning.contrib.django.relay import Relay
    from celery_partitioning.state import partitioning_of

    oa.create_tables()
    with transaction.atomic():
        results = outbox.publish_many([oa.apply_event.s(key="a", seq=s, event_id=f"e{s}")
                                       for s in (1, 2, 3)])
    row = OutboxMessage.objects.order_by("id").first()
    found = {"ids": [r.id for r in results], "declare": row.declare}
    found["relayed"] = Relay(oa.app).relay_once()
    with oa.app.connection_for_write() as conn:
        index = row.headers["partition_index"]
        queue = partitioning_of(oa.app).router.queue("entity", index).bind(conn.channel())
        # declared by the relay with the partition's own arguments, or this would fail
        found["declared"] = queue.declare()
        found["got"] = []
        while (message := queue.get(no_ack=True)) is not None:
            found["got"].append(message.headers["id"])
        queue.delete()
    found["left"] = OutboxMessage.objects.count()
    print(json.dumps(found))
""")


@pytest.mark.integration
def test_on_rabbitmq_the_relay_declares_the_partition_queue_as_apply_async_would(
        redis_url: str, amqp_url: str, namespace: str, tmp_path: Path) -> None:
    # Given calls stored in the outbox before any worker declared their partition queue
    env = {"CP_REDIS_URL": redis_url, "CP_BROKER_URL": amqp_url, "CP_NS": namespace,
           "CP_DB": str(tmp_path / "o.sqlite3")}
    found = _run(env, AMQP_SCENARIO)
    # Then the row carries the queue's declaration (single active consumer)
    assert found["declare"]["queue_arguments"] == {"x-single-active-consumer": True}
    # and the relay declared it so, published with confirms, in order, and deleted the rows
    assert found["relayed"] == 3 and found["left"] == 0
    assert found["got"] == found["ids"]


@pytest.mark.integration
def test_one_relay_per_database_a_standby_takes_over_after_a_warm_stop(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    import signal

    import redis

    from tests.support.procs import Processes, celery_bin, wait_for

    env = {"CP_REDIS_URL": redis_url, "CP_NS": namespace, "CP_DB": str(tmp_path / "o.sqlite3")}
    _run(env, "from tests.apps import outbox_app as oa; oa.create_tables(); print('{}')")
    client = redis.Redis.from_url(redis_url)
    procs = Processes()
    try:
        argv = [celery_bin(), "-A", "tests.apps.outbox_app", "partitioning", "outbox", "relay",
                "--poll", "0.1"]
        log = tmp_path / "relay.log"
        first, second = procs.start(argv, env=env, log=log), procs.start(argv, env=env, log=log)

        def holder() -> int | None:
            for key in client.scan_iter(match=f"{namespace}cp:lease:outbox:*"):
                value = client.get(key)
                return int(value.decode().split("|")[2]) if value else None
            return None

        # Given two relays on one database: one holds the lease, the other waits
        wait_for(lambda: holder() in (first.pid, second.pid), 60, f"a relay to lead ({log})")
        active, standby = (first, second) if holder() == first.pid else (second, first)
        # and `outbox status` names the active one
        shown = subprocess.run([celery_bin(), "-A", "tests.apps.outbox_app", "partitioning",
                                "outbox", "status", "--json"], env={**os.environ, **env,
                               "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr[-3000:]
        status = json.loads(shown.stdout)
        assert status["waiting"] == 0 and status["oldest_age"] is None
        assert status["relay"] == f"outbox-relay@default (pid {active.pid})"
        # When the active one gets SIGTERM
        os.kill(active.pid, signal.SIGTERM)
        # Then it exits 0, and the standby takes the lease at once (released, not expired)
        assert active.wait(30) == 0, log.read_text()[-3000:]
        wait_for(lambda: holder() == standby.pid, 5, "the standby to take over")
        # and relays what commits next
        relayed = _run(env, textwrap.dedent("""
            import json, time
            from django.db import transaction
            from tests.apps import outbox_app as oa
            from celery_partitioning.contrib.django import outbox
            from celery_partitioning.contrib.django.models import OutboxMessage
            with transaction.atomic():
                outbox.publish(oa.apply_event.s(key="a", seq=1, event_id="e1"))
            deadline = time.monotonic() + 30
            while OutboxMessage.objects.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            print(json.dumps(OutboxMessage.objects.count()))
        """))
        assert relayed == 0
        assert standby.poll() is None
    finally:
        procs.kill_all()
        client.close()


EAGER_SCENARIO = textwrap.dedent("""
    import json
    from django.db import transaction
    from tests.apps import outbox_app as oa
    import celery_partitioning as cp
    from celery_partitioning.contrib.django import outbox
    from celery_partitioning.contrib.django.models import OutboxMessage

    oa.app.conf.task_always_eager = True
    oa.create_tables()

    def applied():
        from django.db import connection
        with connection.cursor() as cur:
            cur.execute("SELECT event_id FROM applied ORDER BY id")
            return [r[0] for r in cur.fetchall()]

    found = {}
    try:
        with transaction.atomic():
            outbox.publish(oa.apply_event.s(key="a", seq=1, event_id="rolled"))
            raise oa.Rollback()
    except oa.Rollback:
        pass
    with transaction.atomic():
        results = outbox.publish_many([oa.apply_event.s(key="a", seq=s, event_id=f"e{s}")
                                       for s in (1, 2)])
        found["inside"] = applied()
    found["after"] = applied()
    with transaction.atomic():
        try:
            outbox.publish(oa.apply_event.s(key="a", seq=None, event_id="bad"))
        except cp.PartitionKeyError as exc:
            found["bad"] = str(exc)
    found["rows"] = OutboxMessage.objects.count()
    found["ids"] = len({r.id for r in results})
    print(json.dumps(found))
""")


def test_in_eager_mode_calls_are_checked_at_once_and_run_at_commit_only(
        tmp_path: Path) -> None:
    env = {"CP_REDIS_URL": "redis://127.0.0.1:1/0", "CP_DB": str(tmp_path / "o.sqlite3")}
    found = _run(env, EAGER_SCENARIO)
    # Given task_always_eager: nothing runs inside the transaction, the committed calls run
    # after it in order, the rolled-back one never; a bad call is refused at the call
    assert found["inside"] == []
    assert found["after"] == ["e1", "e2"]
    assert "checkpoint" in found["bad"] and "outbox call 0" in found["bad"]
    assert found["rows"] == 0 and found["ids"] == 2
