"""Effectively-once projections: positions checked at publish, stores checked at start-up,
one commit per (projection, key, position) under concurrency, and real SIGKILLs with and
without checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals

import celery_partitioning as cp
from celery_partitioning.checkpoint import HEADER_POSITION, Mark
from tests.support.procs import ROOT, Processes, alive, celery_bin, wait_for


class MemoryStore:
    """A checkpoint store in a dict (no transaction): enough to publish and to run eagerly."""

    def __init__(self, app: Any = None) -> None:
        self.positions: dict[tuple[str, str], int] = {}
        self.skipped = 0

    @contextlib.contextmanager
    def atomic(self, mark: Mark) -> Iterator[bool]:
        assert mark.position is not None
        last = self.positions.get((mark.projection, mark.key), -1)
        if mark.position <= last:
            self.skipped += 1
            yield False
            return
        yield True
        self.positions[(mark.projection, mark.key)] = mark.position


def _app(store: Any = None) -> Celery:
    app = Celery("cpt", broker="memory://", set_as_current=False)
    app.conf.update(partitioning_pools={"entity": 4, "global": 1}, task_always_eager=False)
    if store is not None:
        app.conf.partitioning_checkpoint_store = store
    cp.install(app)
    return app


def _events_app(store: Any) -> tuple[Celery, Any]:
    app = _app(store)

    @app.task(name="t.summary", shared=False)
    @cp.projection("orderSummary", key=cp.create_entity_partition_key("Order"), pool="entity",
                   checkpoint=lambda args: args["event"]["position"])
    def summary(order_id: str, event: dict[str, Any]) -> str:
        return f"applied {event['position']}"

    app.finalize()
    return app, summary


@pytest.fixture
def published() -> Iterator[list[Any]]:
    sent: list[Any] = []

    def on_publish(headers: Any = None, **_: Any) -> None:
        sent.append(headers)

    signals.before_task_publish.connect(on_publish, weak=False)
    try:
        yield sent
    finally:
        signals.before_task_publish.disconnect(on_publish)


@pytest.mark.parametrize(("event", "problem"), [
    ({}, "KeyError"),
    ({"position": None}, "gave None"),
    ({"position": "17"}, "gave '17'"),
    ({"position": True}, "gave True"),
    ({"position": 1.5}, "gave 1.5"),
    ({"position": -1}, "gave -1"),
    ({"position": 2**63}, "gave 9223372036854775808"),
])
def test_a_missing_or_unorderable_position_is_refused_at_publish(
        event: dict[str, Any], problem: str, published: list[Any]) -> None:
    # Given a projection whose position is a field of its event argument
    _, summary = _events_app(MemoryStore())
    # When a call carries no usable position, Then nothing is published
    with pytest.raises(cp.PartitionKeyError) as err:
        summary.apply_async(kwargs={"order_id": "ord-1", "event": event})
    assert problem in str(err.value) and "t.summary" in str(err.value)
    assert "nothing was published" in str(err.value)
    assert published == []


def test_a_missing_position_argument_names_the_argument(published: list[Any]) -> None:
    app = _app(MemoryStore())

    @app.task(name="t.rollup", shared=False)
    @cp.partitioned(lambda args: cp.GLOBAL_PARTITION_KEY, pool="global", checkpoint="seq")
    def rollup(amount: int, seq: int | None = None) -> None: ...

    app.finalize()
    with pytest.raises(cp.PartitionKeyError, match="checkpoint argument 'seq' gave None"):
        rollup.delay(5)
    assert published == []


def test_the_position_travels_in_a_header_and_explain_route_shows_it(published: list[Any]) -> None:
    app, summary = _events_app(MemoryStore())
    route = cp.explain_route(app, "t.summary", "ord-1", {"position": 41})
    assert route.position == 41 and route.key == "Order:ord-1"
    with app.connection_for_write() as conn:
        summary.apply_async(("ord-1", {"position": 41}), connection=conn)
    assert [h[HEADER_POSITION] for h in published] == [41]


def test_eager_calls_go_through_the_checkpoint() -> None:
    store = MemoryStore()
    app, summary = _events_app(store)
    app.conf.task_always_eager = True
    assert summary.delay("ord-1", {"position": 3}).get() == "applied 3"
    assert summary.delay("ord-1", {"position": 3}).get() is None  # skipped: at the checkpoint
    assert summary.delay("ord-1", {"position": 2}).get() is None  # skipped: below it
    assert summary.delay("ord-1", {"position": 4}).get() == "applied 4"
    assert store.positions == {("orderSummary", "Order:ord-1"): 4} and store.skipped == 2
    # the plain function stays callable without Celery (no checkpoint then)
    assert summary.run("ord-1", {"position": 1}) == "applied 1"
    # and an eager call without a usable position fails like a publish would
    with pytest.raises(cp.PartitionKeyError, match="gave '5'"):
        summary.delay("ord-1", {"position": "5"}).get()


def test_bad_declarations_are_refused_when_declared() -> None:
    app = _app(MemoryStore())
    with pytest.raises(cp.PartitionConfigError, match="checkpoint must be the name"):
        cp.projection("x", key=lambda a: "k", pool="entity", checkpoint="not a name")
    with pytest.raises(cp.PartitionConfigError, match="checkpoint must be the name"):
        cp.partitioned(lambda a: "k", pool="entity", checkpoint=3)  # type: ignore[arg-type]
    with pytest.raises(cp.PartitionConfigError, match="directly above the function"):
        @cp.projection("x", key=lambda a: "k", pool="entity", checkpoint="seq")
        @app.task(name="t.above", shared=False)
        def above(seq: int) -> None: ...


def test_a_checkpoint_without_a_store_fails_validation() -> None:
    # Given an app without Django integration and without partitioning_checkpoint_store
    app = _app()

    @app.task(name="t.fine", shared=False)
    @cp.projection("fine", key=lambda a: "k", pool="entity")
    def fine(seq: int) -> None: ...

    @app.task(name="t.needs_store", shared=False)
    @cp.projection("daily", key=lambda a: cp.GLOBAL_PARTITION_KEY, pool="global", checkpoint="seq")
    def needs_store(seq: int) -> None: ...

    # Then start-up validation lists it (and only it)
    with pytest.raises(cp.PartitionConfigError) as err:
        cp.assert_valid_partition_keys(app)
    text = str(err.value)
    assert "1 partitioning problem" in text
    assert "projection 'daily' (task t.needs_store): has checkpoint= but its app has no " \
           "checkpoint store" in text
    # and a store set by dotted path that does not import is reported the same way
    app.conf.partitioning_checkpoint_store = "no_such_module:Store"
    vars(app)["_celery_partitioning"]._settings = None
    with pytest.raises(cp.PartitionConfigError, match="cannot be imported"):
        cp.assert_valid_partition_keys(app)


def test_a_worker_refuses_to_start_with_a_checkpoint_but_no_store(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        from celery import Celery
        import celery_partitioning as cp
        app = Celery("nostore", broker="memory://")
        app.conf.partitioning_pools = {"global": 1}
        cp.install(app)

        @app.task(name="t.daily")
        @cp.projection("dailySalesSummary", key=lambda a: cp.GLOBAL_PARTITION_KEY,
                       pool="global", checkpoint="seq")
        def daily(seq): ...
    """)
    (tmp_path / "nostore_app.py").write_text(script)
    proc = subprocess.run(
        [celery_bin(), "-A", "nostore_app", "worker", "-P", "solo", "--without-mingle",
         "--without-gossip", "-l", "warning"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "refusing to start the worker" in proc.stderr
    assert "projection 'dailySalesSummary' (task t.daily): has checkpoint= but" in proc.stderr


# ---- with Django and a real database ------------------------------------------------------

CONCURRENCY = textwrap.dedent("""
    import json, threading
    from tests.apps import checkpoint_app as ca
    from celery_partitioning.checkpoint import Mark
    from celery_partitioning.contrib.django.checkpoints import DjangoCheckpointStore
    from django.db import connection, connections

    ca.create_tables()
    store = DjangoCheckpointStore(ca.app)
    THREADS, MARKS = 6, 40
    start = threading.Barrier(THREADS)
    outcomes = []

    def racer(n):
        start.wait()
        try:
            for i in range(1, MARKS + 1):
                for projection, mark in (
                        ("byPosition", Mark("byPosition", "k", i, f"id-{i}-{n}", 100)),
                        ("byId", Mark("byId", "k", None, f"id-{i}", 100))):
                    with store.atomic(mark) as fresh:
                        outcomes.append(fresh)
                        if fresh:
                            with connection.cursor() as cur:
                                cur.execute("INSERT INTO applied (projection, mark) "
                                            "VALUES (%s, %s)", [projection, str(i)])
        finally:
            connections.close_all()

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(THREADS)]
    for t in threads: t.start()
    for t in threads: t.join(120)
    with connection.cursor() as cur:
        cur.execute("SELECT projection, mark FROM applied ORDER BY id")
        applied = cur.fetchall()
    from celery_partitioning.contrib.django.models import Checkpoint
    rows = {c.projection: [c.position, c.applied, c.skipped, len(c.recent_ids)]
            for c in Checkpoint.objects.all()}
    print(json.dumps({"applied": applied, "outcomes": [sum(outcomes), len(outcomes)],
                      "rows": rows}))
""")


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh PostgreSQL database on the local socket (skips on a laptop without; fails in CI)."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    name = f"cp_checkpoints_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(host=os.environ.get("CP_PG_HOST", "/var/run/postgresql"),
                                user="postgres", dbname="postgres", autocommit=True,
                                connect_timeout=5)
    except psycopg.Error as exc:
        message = f"PostgreSQL not reachable: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true)")
        pytest.skip(message)
    try:
        admin.execute(f"CREATE DATABASE {name}")
        yield name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_transactions_for_one_key_never_both_commit(database: str, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    # Given six threads racing through the same marks of one key, on a WAL SQLite file
    # (one writer at a time) or on PostgreSQL (row locks, READ COMMITTED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CP_DB": str(tmp_path / "race.sqlite3"),
           "CP_REDIS_URL": "memory://"}
    if database == "postgresql":
        env["CP_PG_DB"] = request.getfixturevalue("postgres_db")
    proc = subprocess.run([sys.executable, "-c", CONCURRENCY], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    applied = [(p, int(m)) for p, m in found["applied"]]
    by_position = [m for p, m in applied if p == "byPosition"]
    by_id = [m for p, m in applied if p == "byId"]
    # Then every position committed at most once, in increasing order, the last one included
    assert len(by_position) == len(set(by_position)) and by_position == sorted(by_position)
    assert by_position[-1] == 40
    # and every message id exactly once
    assert sorted(by_id) == list(range(1, 41))
    fresh, total = found["outcomes"]
    assert total == 6 * 40 * 2 and fresh == len(applied)
    rows = found["rows"]
    assert rows["byPosition"][:2] == [40, len(by_position)]
    assert rows["byPosition"][2] == 6 * 40 - len(by_position)  # every other claim was counted as skipped
    assert rows["byId"] == [None, 40, 6 * 40 - 40, 40]


@pytest.fixture
def ca_env(redis_url: str, namespace: str, tmp_path: Path) -> dict[str, str]:
    return {"CP_REDIS_URL": redis_url, "CP_NS": namespace, "CP_DB": str(tmp_path / "cp.sqlite3")}


def _run_in_app(env: dict[str, str], code: str) -> Any:
    script = "import json\nfrom tests.apps import checkpoint_app as ca\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env,
                          "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None


def _read(db: str) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(account -> total, projection -> [position, applied, skipped]) straight from the file."""
    import sqlite3

    conn = sqlite3.connect(db, timeout=30)
    try:
        totals = dict(conn.execute("SELECT account, total FROM totals").fetchall())
        rows = {p: [pos, applied, skipped] for p, pos, applied, skipped in conn.execute(
            "SELECT projection, position, applied, skipped FROM celery_partitioning_checkpoint")}
    finally:
        conn.close()
    return totals, rows


def _run_with_kills(tasks: dict[str, str], messages: int, kill_at: list[int], env: dict[str, str],
                    namespace: str, redis_url: str, processes: Processes,
                    log: Path) -> tuple[int, dict[str, int], dict[str, list[int]]]:
    """Publish seq 1..messages to each task (account = its key in ``tasks``), SIGKILL the worker
    after each message of ``kill_at`` committed and before its ack; wait until all ran."""
    import redis

    client = redis.Redis.from_url(redis_url)
    env = {**env, "CP_BLOCK_AT": ",".join(map(str, kill_at))}
    _run_in_app(env, "ca.create_tables()")
    worker = processes.start([celery_bin(), "-A", "tests.apps.checkpoint_app", "partitioning",
                              "worker", "-l", "info"], env=env, log=log)
    _run_in_app(env, f"""
        for seq in range(1, {messages} + 1):
            for account, task in {tasks!r}.items():
                getattr(ca, task).delay(account=account, amount=seq, seq=seq)
    """)

    def blocked_pids() -> list[tuple[bytes, int]]:
        found = [(k, int(client.get(k) or 0)) for k in client.scan_iter(match=f"{namespace}blocked:*")]
        return [(k, pid) for k, pid in found if pid]

    killed = 0
    while killed < len(tasks) * len(kill_at):
        wait_for(lambda: bool(blocked_pids()) or not alive(worker.pid), 90,
                 f"a worker blocked before its ack ({killed} kills so far; see {log})")
        assert alive(worker.pid), log.read_text()[-3000:]
        for key, pid in blocked_pids():
            client.set(key, 0)  # handled: its rerun must not block
            os.kill(pid, 9)
            killed += 1
            wait_for(lambda p=pid: not alive(p), 10, "the killed worker to go")
    expected = sum(range(1, messages + 1))

    def all_ran() -> bool:
        totals, _ = _read(env["CP_DB"])
        return len(totals) == len(tasks) and min(totals.values()) >= expected

    wait_for(all_ran, 120, f"every message to run (see {log})", interval=0.5)
    totals, rows = _read(env["CP_DB"])
    return killed, totals, rows


@pytest.mark.integration
def test_sigkill_after_commit_before_ack_reruns_a_message_but_checkpoints_skip_it(
        ca_env: dict[str, str], namespace: str, redis_url: str, processes: Processes,
        tmp_path: Path) -> None:
    # Given a partition worker, and the events 1..12 of two accounts: one projection with a
    # checkpoint, the same read-modify-write without one
    # (one kill each: the supervisor's restart backoff doubles with every quick death, so a
    # second round would cost seconds and show nothing the first does not)
    messages, kill_at, log = 12, [4], tmp_path / "worker.log"
    # When the worker is SIGKILLed after each account's message 4 committed, before its ack
    # (the second kill hits the process restarted after the first)
    killed, totals, rows = _run_with_kills(
        {"checked": "add_checked", "plain": "add_plain"}, messages, kill_at, ca_env, namespace,
        redis_url, processes, log)
    assert killed == 2
    expected = sum(range(1, messages + 1))  # the sequential replay
    # Then with the checkpoint the total equals the sequential replay: each rerun was skipped
    assert totals["checked"] == expected
    assert rows["totals"] == [messages, messages, len(kill_at)]
    # and without it every rerun applied its event a second time
    assert totals["plain"] == expected + sum(kill_at)
    assert "skipped, already applied" in log.read_text()
    # and `status --json` shows the checkpoint's counts
    status = subprocess.run([celery_bin(), "-A", "tests.apps.checkpoint_app", "partitioning",
                             "status", "--json"],
                            env={**os.environ, **ca_env, "PYTHONPATH": str(ROOT)},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["checkpoints"]
    assert shown["totals"]["skipped"] == len(kill_at) and shown["totals"]["applied"] == messages
    assert shown["totals"]["keys"] == 1 and shown["totalsById"]["keys"] == 0


@pytest.mark.integration
def test_without_positions_a_rerun_is_skipped_by_its_message_id(
        ca_env: dict[str, str], namespace: str, redis_url: str, processes: Processes,
        tmp_path: Path) -> None:
    # Given a projection that deduplicates by message id (checkpoint=MESSAGE_ID)
    messages, kill_at = 8, [3, 6]
    # When its worker is SIGKILLed after two messages committed, before their acks
    killed, totals, rows = _run_with_kills({"byid": "add_by_id"}, messages, kill_at, ca_env,
                                           namespace, redis_url, processes, tmp_path / "worker.log")
    # Then the reruns were skipped: the total is the sequential replay's
    assert killed == 2
    assert totals["byid"] == sum(range(1, messages + 1))
    assert rows["totalsById"] == [None, messages, len(kill_at)]


class Sqlite3Store:
    """The protocol on a plain DB-API connection (what an SQLAlchemy store looks like)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @contextlib.contextmanager
    def atomic(self, mark: Mark) -> Iterator[bool]:
        with self.conn:  # sqlite3: commit on success, roll back on an exception
            advanced = self.conn.execute(
                "UPDATE checkpoints SET position = ? WHERE projection = ? AND key = ? "
                "AND position < ?", (mark.position, mark.projection, mark.key, mark.position),
            ).rowcount
            if not advanced:
                try:
                    self.conn.execute("INSERT INTO checkpoints VALUES (?, ?, ?)",
                                      (mark.projection, mark.key, mark.position))
                except Exception:  # the unique (projection, key): at or below the checkpoint
                    yield False
                    return
            yield True


def test_a_failing_body_rolls_back_with_its_checkpoint_and_runs_again(tmp_path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "own.sqlite3", isolation_level="DEFERRED")
    conn.execute("CREATE TABLE checkpoints (projection TEXT, key TEXT, position INTEGER, "
                 "PRIMARY KEY (projection, key))")
    conn.execute("CREATE TABLE totals (key TEXT PRIMARY KEY, total INTEGER)")
    conn.commit()
    # Given an app whose checkpoint store is a custom object (no Django)
    app = _app(Sqlite3Store(conn))
    app.conf.task_always_eager = True
    fail = {"on": True}

    @app.task(name="t.total", shared=False)
    @cp.partitioned(lambda a: f"acct:{a['account']}", pool="entity", checkpoint="seq")
    def total(account: str, amount: int, seq: int) -> None:
        conn.execute("INSERT INTO totals VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                     "total = total + excluded.total", (account, amount))
        if fail["on"]:
            raise RuntimeError("the database write after this one failed")

    app.finalize()
    cp.assert_valid_partition_keys(app)  # a custom store satisfies the start-up check
    # When the body fails after writing, Then its write and its checkpoint are rolled back
    with pytest.raises(RuntimeError):
        total.apply(("a", 5, 1), throw=True)
    assert conn.execute("SELECT count(*) FROM totals").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM checkpoints").fetchone() == (0,)
    # and the same message applies once it succeeds, once only
    fail["on"] = False
    total.apply(("a", 5, 1))
    total.apply(("a", 5, 1))
    assert conn.execute("SELECT total FROM totals").fetchall() == [(5,)]
    assert conn.execute("SELECT position FROM checkpoints").fetchall() == [(1,)]


def test_an_unknown_checkpoint_database_fails_validation_naming_the_setting(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os
        os.environ["CP_REDIS_URL"] = "memory://"
        from django.conf import settings
        settings.configure(INSTALLED_APPS=["celery_partitioning.contrib.django"],
                           DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                                  "NAME": ":memory:"}})
        import django
        django.setup()
        from tests.apps import checkpoint_app as ca
        import celery_partitioning as cp
        ca.app.conf.partitioning_checkpoint_database = "projections"
        try:
            cp.assert_valid_partition_keys(ca.app)
        except cp.PartitionConfigError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 partitioning problem(s)" in proc.stdout  # add_checked and add_by_id
    assert "projection 'totals' (task cp.add_checked): has checkpoint= but setting " \
           "partitioning_checkpoint_database (Django: CELERY_PARTITIONING_CHECKPOINT_DATABASE) " \
           "is 'projections', which is not in DATABASES (default)" in proc.stdout
