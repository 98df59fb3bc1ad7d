"""``publish_many``: the same messages as ``apply_async``, all or nothing on bad input, order per
queue, an exact account of a broker failure, and per-key order through real partition workers.
"""

from __future__ import annotations

import base64
import json
import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery, chain
from celery.result import AsyncResult
from celery.signals import after_task_publish, before_task_publish

import celery_partitioning as cp
from celery_partitioning import (
    PartitionKeyError,
    PublishManyError,
    create_entity_partition_key,
    explain_route,
    partitioned,
    publish_many,
)
from tests.apps.harness import Harness, delete_amqp_queues, keyed_events
from tests.support.ordering import check
from tests.support.procs import Processes

pytestmark = pytest.mark.integration

POOL = {"entity": 4}


def make_app(broker: str, ns: str, **conf: Any) -> Celery:
    app = Celery(f"{ns}pm", broker=broker, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": ns} if broker.startswith("redis") else {},
        partitioning_pools=POOL, partitioning_queue_prefix=f"{ns}partition",
        task_default_queue=f"{ns}plain", broker_connection_retry_on_startup=False, **conf,
    )
    cp.install(app)

    @app.task(name="pm.item_added", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def item_added(order_id: str, seq: int, event: dict[str, Any] | None = None) -> None:
        return None

    @app.task(name="pm.plain", shared=False)
    def plain(n: int) -> int:
        return n * 2

    app.finalize()
    return app


def queue_key(ns: str, app: Celery, index: int) -> str:
    """kombu's Redis list of partition ``index`` (under the app's global_keyprefix)."""
    return f"{ns}{cp.state.settings_of(app).queue_name('entity', index)}"


def consumed_order(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    """The messages of a kombu Redis queue in the order a consumer gets them (LPUSH, BRPOP)."""
    return [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[Celery]:
    app = make_app(redis_url, namespace)
    yield app
    app.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def lists_of(client: redis.Redis, ns: str) -> list[bytes]:
    return [k for k in client.scan_iter(match=f"{ns}*", count=1000) if client.type(k) == b"list"]


# --- messages ------------------------------------------------------------------------------------

#: Call options that change the message: none (the task's template), and some that do.
OPTION_SETS = {
    "no options": {},
    "message options": {"retries": 2, "time_limit": 30, "soft_time_limit": 10,
                        "shadow": "renamed", "headers": {"trace": "t-1"}},
    "compressed": {"compression": "zlib", "expires": 600},
}


@pytest.mark.parametrize("options", list(OPTION_SETS.values()), ids=list(OPTION_SETS))
def test_a_published_message_is_the_one_apply_async_writes(app: Celery, namespace: str,
                                                           client: redis.Redis,
                                                           options: dict[str, Any]) -> None:
    from kombu.utils.json import dumps

    task = app.tasks["pm.item_added"]
    event = {"type": "ItemAdded", "order_id": "ord-1", "note": "it's \"ü\"",
             "lines": [{"sku": "s", "qty": 1}]}
    task.apply_async(("ord-1", 0), {"event": event}, task_id="id-apply", **options)
    [result] = publish_many([task.s("ord-1", 0, event=event).set(task_id="id-many", **options)],
                            app=app)
    assert result.id == "id-many"

    route = explain_route(app, "pm.item_added", "ord-1", 0, event=event)
    key = f"{namespace}{route.queue}"
    raw_apply, raw_many = reversed(client.lrange(key, 0, -1))
    # Byte for byte what kombu's JSON writes for that message (the same envelope it parses to).
    assert raw_many.decode() == dumps(json.loads(raw_many))
    by_apply, by_many = json.loads(raw_apply), json.loads(raw_many)

    def comparable(message: dict[str, Any]) -> dict[str, Any]:
        message = json.loads(json.dumps(message))
        for name in ("id", "root_id", "partition_published_at", "expires"):
            message["headers"].pop(name)
        for name in ("correlation_id", "delivery_tag"):
            message["properties"].pop(name)
        return message

    assert by_many["headers"]["id"] == "id-many"
    assert by_many["properties"]["correlation_id"] == "id-many"
    assert comparable(by_many) == comparable(by_apply)
    assert list(by_many) == list(by_apply)  # even the key order of kombu's envelope,
    for part in ("headers", "properties"):  # of its headers and properties
        assert list(by_many[part]) == list(by_apply[part])
    assert list(by_many["properties"]["delivery_info"]) == list(by_apply["properties"]["delivery_info"])
    assert by_many["headers"]["partition_key"] == route.key == "Order:ord-1"
    assert by_many["headers"]["partition_index"] == route.index
    if "compression" not in options:
        assert json.loads(base64.b64decode(by_many["body"]))[1] == {"event": event}

    # A plain kombu consumer reads it back.
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        first = channel.basic_get(route.queue, no_ack=True)
        second = channel.basic_get(route.queue, no_ack=True)
    assert first.headers["id"] == "id-apply"
    assert second.headers["id"] == "id-many"
    assert second.decode()[0] == ["ord-1", 0]


@pytest.mark.rabbitmq
@pytest.mark.parametrize("options", list(OPTION_SETS.values()), ids=list(OPTION_SETS))
def test_a_message_on_rabbitmq_decodes_as_the_one_apply_async_sends(amqp_url: str,
                                                                    options: dict[str, Any]) -> None:
    ns = f"cppm-{uuid.uuid4().hex[:8]}-"
    app = make_app(amqp_url, ns)
    route = explain_route(app, "pm.item_added", "ord-1", 0)
    try:
        task = app.tasks["pm.item_added"]
        task.apply_async(("ord-1", 0), {"event": {"n": "ü"}}, task_id="id-x", **options)
        publish_many([task.s("ord-1", 0, event={"n": "ü"}).set(task_id="id-x", **options)],
                     app=app)
        with app.connection_for_read() as conn:
            queue = app.amqp.queues[route.queue].bind(conn.default_channel)
            one, two = queue.get(no_ack=True), queue.get(no_ack=True)
        for message in (one, two):
            message.headers.pop("partition_published_at"), message.headers.pop("expires")
            message.properties.pop("delivery_info", None)
        assert (two.headers, two.properties, two.decode()) == (one.headers, one.properties,
                                                                one.decode())
        assert list(two.headers) == list(one.headers)
    finally:
        app.close()
        delete_amqp_queues(amqp_url, [f"{ns}partition.entity.{i}" for i in range(POOL["entity"])])


def test_calls_keep_their_order_in_every_queue_across_chunks(app: Celery, namespace: str,
                                                             client: redis.Redis) -> None:
    task = app.tasks["pm.item_added"]
    counts: dict[str, int] = {}
    sigs = []
    for i in range(1200):
        order = f"ord-{(i * 7) % 50}"
        seq = counts.get(order, 0)
        counts[order] = seq + 1
        sigs.append(task.s(order, seq))
    results = publish_many(sigs, app=app, chunk_size=128)

    assert len(results) == len(sigs)
    seen: dict[str, list[int]] = {}
    ids = []
    for index in range(POOL["entity"]):
        for message in consumed_order(client, queue_key(namespace, app, index)):
            args = json.loads(base64.b64decode(message["body"]))[0]
            assert message["headers"]["partition_index"] == index
            assert explain_route(app, "pm.item_added", *args).index == index
            seen.setdefault(args[0], []).append(args[1])
            ids.append(message["headers"]["id"])
    assert seen == {order: list(range(n)) for order, n in counts.items()}
    assert sorted(ids) == sorted(r.id for r in results)


def test_calls_of_plain_tasks_go_where_celery_routes_them(app: Celery, namespace: str,
                                                          client: redis.Redis) -> None:
    part, plain = app.tasks["pm.item_added"], app.tasks["pm.plain"]
    sigs = [plain.s(0), part.s("ord-1", 0), plain.s(1), plain.s(2).set(queue=f"{namespace}other"),
            part.s("ord-1", 1), plain.s(3)]
    publish_many(sigs, app=app)
    plain_queue = consumed_order(client, f"{namespace}{namespace}plain")
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in plain_queue] == [[0], [1], [3]]
    assert all("partition_key" not in m["headers"] for m in plain_queue)
    other = consumed_order(client, f"{namespace}{namespace}other")
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in other] == [[2]]
    route = explain_route(app, "pm.item_added", "ord-1", 0)
    assert len(consumed_order(client, f"{namespace}{route.queue}")) == 2


def test_a_priority_message_goes_where_kombu_puts_it(app: Celery, namespace: str,
                                                      client: redis.Redis) -> None:
    # A plain task may use priorities: kombu's Redis transport keeps a list per priority step,
    # which publish_many leaves to kombu's own publish batch.
    plain = app.tasks["pm.plain"]
    plain.apply_async((1,), priority=5, task_id="id-apply")
    publish_many([plain.s(2).set(priority=5, task_id="id-many"), plain.s(3)], app=app)
    queue = f"{namespace}{namespace}plain"
    stepped = [k for k in lists_of(client, namespace) if k.decode().startswith(queue + "\x06\x16")]
    assert len(stepped) == 1
    ids = [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(stepped[0], 0, -1))]
    assert ids == ["id-apply", "id-many"]
    assert [json.loads(raw)["headers"]["argsrepr"] for raw in client.lrange(queue, 0, -1)] == ["(3,)"]


def test_a_call_through_a_named_exchange_reaches_its_bound_queue_as_apply_async_s(
        app: Celery, namespace: str, client: redis.Redis) -> None:
    from kombu import Exchange, Queue

    routed = Queue(f"{namespace}routed", Exchange(f"{namespace}ex", type="direct"),
                   routing_key="rk")
    with app.connection_for_write() as conn:
        routed.bind(conn.default_channel).declare()  # the binding kombu's Redis looks up
    plain = app.tasks["pm.plain"]
    plain.apply_async((1,), task_id="id-apply", exchange=f"{namespace}ex", routing_key="rk")
    publish_many([plain.s(1).set(task_id="id-many", exchange=f"{namespace}ex", routing_key="rk")],
                 app=app)
    raw_apply, raw_many = (json.loads(raw) for raw in
                           reversed(client.lrange(f"{namespace}{namespace}routed", 0, -1)))
    for message in (raw_apply, raw_many):
        message["headers"].pop("id"), message["headers"].pop("root_id")
        message["properties"].pop("correlation_id"), message["properties"].pop("delivery_tag")
    assert raw_many == raw_apply
    assert list(raw_many["properties"]) == list(raw_apply["properties"])


@pytest.mark.parametrize("option", [{"retry_on_timeout": True}, {"body_encoding": "plain"}],
                         ids=["retry_on_timeout", "body_encoding"])
def test_a_redis_transport_option_the_batch_cannot_honour_is_refused(
        redis_url: str, namespace: str, client: redis.Redis, option: dict[str, object]) -> None:
    app = make_app(redis_url, namespace)
    app.conf.broker_transport_options = {"global_keyprefix": namespace, **option}
    try:
        with pytest.raises(cp.PartitionConfigError, match=next(iter(option))):
            publish_many([app.tasks["pm.plain"].s(1)], app=app)
    finally:
        app.close()
    assert lists_of(client, namespace) == []


# --- all or nothing ------------------------------------------------------------------------------

def _bad_calls(app: Celery, namespace: str) -> dict[str, tuple[Any, str]]:
    part, plain = app.tasks["pm.item_added"], app.tasks["pm.plain"]
    return {
        "no key": (part.s(order_id=None, seq=1), "key function create_entity_partition_key('Order') failed"),
        "missing argument": (part.s(seq=1), "missing 1 required positional argument"),
        "fixed queue": (part.s("ord-1", 1).set(queue=f"{namespace}elsewhere"), "may not set queue="),
        "priority": (part.s("ord-1", 1).set(priority=5), "may not set priority=5"),
        "link": (part.s("ord-1", 1).set(link=plain.s(1)), "does not send the option(s) link"),
        "canvas": (chain(plain.s(1), plain.s(2)), "not a single task call"),
        "wrong arguments": (plain.s(1, 2, 3), "TypeError"),
        "unknown task": (app.signature("pm.nope", (1,)), "unknown task 'pm.nope'"),
        "unserializable": (plain.s(object()), "EncodeError"),
    }


@pytest.mark.parametrize("case", ["no key", "missing argument", "fixed queue", "priority", "link",
                                  "canvas", "wrong arguments", "unknown task", "unserializable"])
def test_a_bad_call_anywhere_publishes_nothing(app: Celery, namespace: str, client: redis.Redis,
                                               case: str) -> None:
    bad, reason = _bad_calls(app, namespace)[case]
    task = app.tasks["pm.item_added"]
    sigs = [task.s(f"ord-{i}", 0) for i in range(700)]
    sigs.insert(613, bad)
    published: list[str] = []

    def record(sender: Any = None, headers: Any = None, **_: Any) -> None:
        published.append(headers["id"])

    before_task_publish.connect(record, weak=False)
    try:
        with pytest.raises(PartitionKeyError) as info:
            publish_many(sigs, app=app, chunk_size=100)
    finally:
        before_task_publish.disconnect(record)
    assert "call 613" in str(info.value)
    assert reason in str(info.value)
    assert "nothing was published" in str(info.value)
    assert published == []
    assert lists_of(client, namespace) == []


def test_the_error_names_the_first_bad_position(app: Celery) -> None:
    task = app.tasks["pm.item_added"]
    sigs = [task.s("ord-1", 0), task.s(seq=1), task.s("ord-2", 0), task.s(seq=2)]
    with pytest.raises(PartitionKeyError, match=r"call 1 \(pm.item_added\)"):
        publish_many(sigs, app=app)


# --- signals and results -------------------------------------------------------------------------

def test_publish_signals_fire_per_message_after_before(app: Celery) -> None:
    task = app.tasks["pm.item_added"]
    events: list[tuple[str, str]] = []

    seen: list[tuple[Any, Any]] = []

    def before(sender: Any = None, headers: Any = None, body: Any = None, **_: Any) -> None:
        events.append(("before", headers["id"]))
        headers["traced"] = "yes"  # receivers may add headers, as with apply_async
        seen.append((list(headers["timelimit"]), dict(body[2])))
        headers["timelimit"].append("changed")  # ... or change one message's parts in place,
        body[2]["changed"] = True  # which changes no other message's

    def after(sender: Any = None, headers: Any = None, **_: Any) -> None:
        events.append(("after", headers["id"]))

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    try:
        results = publish_many([task.s(f"ord-{i}", 0) for i in range(5)], app=app, chunk_size=2)
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
    ids = [r.id for r in results]
    # Per chunk: every message's before, the round trip, then every message's after.
    assert events == [("before", ids[0]), ("before", ids[1]), ("after", ids[0]), ("after", ids[1]),
                      ("before", ids[2]), ("before", ids[3]), ("after", ids[2]), ("after", ids[3]),
                      ("before", ids[4]), ("after", ids[4])]
    assert all(timelimit == [None, None] and "changed" not in embed for timelimit, embed in seen)
    with app.connection_for_read() as conn:
        route = explain_route(app, "pm.item_added", "ord-0", 0)
        message = conn.default_channel.basic_get(route.queue, no_ack=True)
    assert message.headers["traced"] == "yes"


@pytest.mark.timeout(60)
def test_task_sent_events_are_sent_when_the_app_asks_for_them(redis_url: str,
                                                             namespace: str) -> None:
    import threading

    app = make_app(redis_url, namespace, task_send_sent_event=True)
    seen: list[dict[str, Any]] = []
    probed = threading.Event()
    conn = app.connection_for_read()

    def on_sent(event: dict[str, Any]) -> None:
        seen.append(event)
        receiver.should_stop = len(seen) >= 3

    # Events travel by Redis pub/sub, which keeps nothing for a subscriber not yet there, and
    # the receiver subscribes in its first poll, after it says it is ready: probe events are
    # sent until one arrives, and only then is the batch published.
    receiver = app.events.Receiver(conn, handlers={"task-sent": on_sent,
                                                   "cpprobe-ping": lambda _: probed.set()})

    def listen() -> None:
        for _ in receiver.consume(safety_interval=0.2, wakeup=False):
            pass  # until on_sent has seen three, or the test is over (should_stop)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        with app.events.default_dispatcher() as dispatcher:
            deadline = time.monotonic() + 20
            while not probed.wait(0.1):
                assert time.monotonic() < deadline, "the event receiver never subscribed"
                dispatcher.send("cpprobe-ping")
        task = app.tasks["pm.item_added"]
        results = publish_many([task.s(f"ord-{i}", i) for i in range(3)], app=app)
        listener.join(timeout=20)
    finally:
        receiver.should_stop = True
        listener.join(timeout=5)
        conn.close()
        app.close()
    assert [e["uuid"] for e in seen] == [r.id for r in results]
    route = explain_route(app, "pm.item_added", "ord-0", 0)
    assert seen[0]["queue"] == route.queue and seen[0]["name"] == "pm.item_added"


@pytest.mark.timeout(60)
def test_results_are_usable_with_a_result_backend(redis_url: str, namespace: str) -> None:
    from celery.contrib.testing.worker import start_worker

    app = make_app(redis_url, namespace, result_backend=redis_url)
    try:
        plain = app.tasks["pm.plain"]
        with start_worker(app, queues=[f"{namespace}plain"], perform_ping_check=False,
                          shutdown_timeout=20):
            results = publish_many([plain.s(n) for n in range(5)], app=app)
            called: list[str] = []
            results[0].then(lambda result: called.append(result.id))  # its on_ready promise
            assert [r.get(timeout=20) for r in results] == [0, 2, 4, 6, 8]
        assert called == [results[0].id]
        assert all(isinstance(r, app.AsyncResult) for r in results)
        copied = pickle.loads(pickle.dumps(results[1]))  # as Celery pickles results
        assert isinstance(copied, AsyncResult) and copied.id == results[1].id
    finally:
        app.close()


def test_eager_mode_checks_every_call_then_runs_each_through_apply_async(
        redis_url: str, namespace: str) -> None:
    app = make_app(redis_url, namespace, task_always_eager=True)
    ran: list[int] = []

    @app.task(name="pm.recorded", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def recorded(order_id: str, seq: int) -> int:
        ran.append(seq)
        return seq

    try:
        assert [r.get() for r in publish_many([recorded.s("ord-1", 0), recorded.s("ord-1", 1)],
                                              app=app)] == [0, 1]
        assert ran == [0, 1]
        with pytest.raises(PartitionKeyError, match="call 1"):
            publish_many([recorded.s("ord-1", 2), recorded.s(seq=3)], app=app)
        assert ran == [0, 1]  # the good call before the bad one did not run either
    finally:
        app.close()


# --- a broker that dies mid-batch ----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_broker_dying_mid_batch_is_reported_exactly_and_resumable(
        processes: Processes, tmp_path: Path) -> None:
    from tests.reliability.conftest import PrivateRedis

    server = PrivateRedis(processes, tmp_path)  # AOF with fsync always: it restarts with its data
    server.start()
    ns = f"cppm-{uuid.uuid4().hex[:8]}:"
    app = make_app(server.url, ns, broker_connection_timeout=2)
    task = app.tasks["pm.item_added"]
    counts: dict[str, int] = {}
    sigs = []
    for i in range(350):
        order = f"ord-{i % 23}"
        seq = counts.get(order, 0)
        counts[order] = seq + 1
        sigs.append(task.s(order, seq).set(task_id=f"t-{i}"))
    composed: list[str] = []

    def kill_the_broker_at_250(sender: Any = None, headers: Any = None, **_: Any) -> None:
        composed.append(headers["id"])
        if headers["id"] == "t-250":
            server.kill()  # SIGKILL: the 3rd chunk's pipeline meets a dead server

    before_task_publish.connect(kill_the_broker_at_250, weak=False)
    try:
        with pytest.raises(PublishManyError) as info:
            publish_many(sigs, app=app, chunk_size=100)
    finally:
        before_task_publish.disconnect(kill_the_broker_at_250)
    error = info.value
    assert error.published == tuple(range(200))
    assert error.unconfirmed == tuple(range(200, 300))
    assert error.not_sent == tuple(range(300, 350))
    assert error.task_ids == tuple(f"t-{i}" for i in range(350))
    assert composed[-1] == "t-299"  # the rest was never even handed to kombu

    server.start()  # from its append-only file: what the broker had when it died
    client = redis.Redis.from_url(server.url)
    try:
        def on_broker() -> list[str]:
            return [m["headers"]["id"] for index in range(POOL["entity"])
                    for m in consumed_order(client, queue_key(ns, app, index))]

        assert sorted(on_broker(), key=lambda t: int(t[2:])) == [f"t-{i}" for i in range(200)]

        # Resume: the unconfirmed and the unsent calls, in order, with the same ids.
        publish_many([sigs[i] for i in error.unconfirmed + error.not_sent], app=app, chunk_size=100)
        ids = on_broker()
        assert sorted(ids, key=lambda t: int(t[2:])) == [f"t-{i}" for i in range(350)]  # no gap, no dup
        for index in range(POOL["entity"]):
            per_key: dict[str, list[int]] = {}
            for message in consumed_order(client, queue_key(ns, app, index)):
                order, seq = json.loads(base64.b64decode(message["body"]))[0]
                per_key.setdefault(order, []).append(seq)
            assert all(seqs == sorted(seqs) for seqs in per_key.values()), per_key
    finally:
        client.close()
        app.close()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_a_rabbitmq_connection_closed_mid_batch_is_reported_without_false_claims(
        amqp_url: str) -> None:
    import os
    import shutil

    import psutil
    from kombu import Connection

    from tests.reliability.test_rabbitmq_drop import close_connections

    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH: cannot close a connection broker-side")
    ns = f"cppm-{uuid.uuid4().hex[:8]}-"
    app = make_app(amqp_url, ns)
    task = app.tasks["pm.item_added"]
    sigs = [task.s(f"ord-{i % 23}", i).set(task_id=f"t-{i}") for i in range(350)]
    port = urlsplit(amqp_url).port or 5672

    def close_ours_at_250(sender: Any = None, headers: Any = None, **_: Any) -> None:
        if headers["id"] == "t-250":  # the broker closes this process's connections
            ours = {c.laddr.port for c in psutil.Process(os.getpid()).net_connections(kind="tcp")
                    if c.raddr and c.raddr.port == port}
            assert close_connections(ours) >= 1

    before_task_publish.connect(close_ours_at_250, weak=False)
    queues = [f"{ns}partition.entity.{i}" for i in range(POOL["entity"])]
    try:
        with pytest.raises(PublishManyError) as info:
            publish_many(sigs, app=app, chunk_size=100)
        error = info.value
        confirmed, sent = len(error.published), len(error.published) + len(error.unconfirmed)
        # The broker acked the first chunk at least (the sender waits for chunk k's confirms
        # before it sends chunk k + 2); writes went on until the socket failed (unconfirmed:
        # written, never acked), and nothing after that was sent.
        assert 100 <= confirmed <= 250 <= sent <= 350
        assert error.published == tuple(range(confirmed))
        assert error.unconfirmed == tuple(range(confirmed, sent))
        assert error.not_sent == tuple(range(sent, 350))
        on_broker = set()
        with Connection(amqp_url) as conn:
            channel = conn.channel()
            for name in queues:
                while (message := channel.basic_get(name, no_ack=True)) is not None:
                    on_broker.add(int(message.headers["id"][2:]))
        assert set(range(confirmed)) <= on_broker  # every "published" call is really there
        assert not on_broker & set(error.not_sent)  # and nothing "not sent" is
    finally:
        before_task_publish.disconnect(close_ours_at_250)
        app.close()
        delete_amqp_queues(amqp_url, queues)


# --- real partition workers ----------------------------------------------------------------------


def _publish_and_drain(h: Harness) -> None:
    events, counts = keyed_events(keys=80, total=1200, ms=0, seed=16)
    task = h.app().tasks["ordering.record"]
    h.start_workers("workers")
    results = publish_many([task.s(key, seq, ms=ms) for key, seq, ms, _sig in events],
                           app=h.app(), chunk_size=500)
    assert len({r.id for r in results}) == len(events)
    h.wait_done(len(events), timeout=120, logs=["workers"])
    report = check(h.records(counts), counts)
    assert report.ok, report.summary()
    assert report.reruns == 0


@pytest.mark.timeout(240)
def test_partition_workers_run_a_published_batch_in_per_key_order_on_redis(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    url = redis_url
    _publish_and_drain(Harness(url, url, namespace, 4, tmp_path, processes))


@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
def test_partition_workers_run_a_published_batch_in_per_key_order_on_rabbitmq(
        amqp_url: str, redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    h = Harness(amqp_url, redis_url, namespace, 4, tmp_path, processes)
    try:
        _publish_and_drain(h)
    finally:
        processes.kill_all()
        delete_amqp_queues(amqp_url, [f"{namespace}partition.p.{i}" for i in range(4)])
