"""Routing without a broker: decorators in every position, every way of publishing, bad calls.

Messages go to kombu's in-memory transport; what was published is read from the
``before_task_publish`` signal (queue and headers exactly as they leave the producer).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery, Task, chain, chord, group, shared_task, signals

import celery_partitioning as cp
from celery_partitioning import (
    GLOBAL_PARTITION_KEY,
    PartitionConfigError,
    PartitionKeyError,
    create_customer_partition_key,
    create_entity_partition_key,
    partition_for,
    partitioned,
    projection,
)


@dataclass
class Published:
    task: str
    queue: str
    headers: dict[str, Any]


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery(f"t{uuid.uuid4().hex[:8]}", broker="memory://", backend="cache+memory://",
                 set_as_current=True)
    app.conf.partitioning_pools = {"entity": 10, "customer": 5, "global": 1, "saga": 5}
    cp.install(app)
    yield app


@pytest.fixture
def published(app: Celery) -> Iterator[list[Published]]:
    seen: list[Published] = []

    def record(sender: str | None = None, routing_key: str | None = None,
               headers: dict[str, Any] | None = None, **_: Any) -> None:
        if sender:
            seen.append(Published(sender, routing_key or "", dict(headers or {})))

    signals.before_task_publish.connect(record, weak=False)
    yield seen
    signals.before_task_publish.disconnect(record)


def entity_queue(key: str) -> str:
    return f"partition.entity.{partition_for(key, 10)}"


def test_decorator_below_app_task_routes_delay(app: Celery, published: list[Published]) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def item_added(order_id: str, sku: str, qty: int = 1) -> None: ...

    item_added.delay("ord-123", "sku-1")
    assert published[0].queue == entity_queue("Order:ord-123")
    assert published[0].headers["partition_key"] == "Order:ord-123"
    assert published[0].headers["partition_pool"] == "entity"
    assert published[0].headers["partition_index"] == partition_for("Order:ord-123", 10)
    assert published[0].headers["partition_count"] == 10
    assert isinstance(published[0].headers["partition_published_at"], float)


def test_decorator_above_app_task_bound(app: Celery, published: list[Published]) -> None:
    @partitioned(create_customer_partition_key(), pool="customer")
    @app.task(bind=True)
    def history(self: Task, customer_id: str, n: int) -> None: ...

    history.apply_async(("cust-123", 1))
    history.apply_async(kwargs={"customer_id": "cust-123", "n": 2})
    assert {p.queue for p in published} == {f"partition.customer.{partition_for('cust-123', 5)}"}


def test_decorators_with_shared_task_both_ways(app: Celery, published: list[Published]) -> None:
    name_a, name_b = f"{app.main}.daily", f"{app.main}.saga"

    @shared_task(bind=True, name=name_a)
    @projection("dailySalesSummary", key=lambda args: GLOBAL_PARTITION_KEY, pool="global")
    def daily(self: Task, order_id: str, total: int) -> None: ...

    @projection("orderWithInventory", key=cp.create_saga_partition_key())
    @shared_task(name=name_b)
    def saga(correlation_id: str) -> None: ...

    daily.delay("o-1", 5)
    saga.delay(correlation_id="corr-123")
    assert [p.queue for p in published] == ["partition.global.0",
                                            f"partition.saga.{partition_for('corr-123', 5)}"]


def test_class_based_task_attributes(app: Celery, published: list[Published]) -> None:
    class OrderTask(Task):  # type: ignore[misc]
        name = f"{app.main}.class_based"
        partition_key = create_entity_partition_key("Order")
        partition_pool = "entity"

        def run(self, order_id: str) -> None: ...

    task = app.register_task(OrderTask())
    task.delay("ord-9")
    # A plain function as a class attribute is not bound to the task.
    def keyed(x: str) -> None: ...

    app.task(name=f"{app.main}.kw", partition_key=lambda args: args["x"], partition_pool="global")(
        keyed
    ).delay("k")
    assert [p.queue for p in published] == [entity_queue("Order:ord-9"), "partition.global.0"]


def test_send_task_signature_and_user_headers(app: Celery, published: list[Published]) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(order_id: str) -> None: ...

    app.send_task(t.name, ("ord-1",))
    t.s("ord-2").apply_async()
    t.apply_async(("ord-3",), headers={"trace": "abc"})
    assert [p.headers["partition_key"] for p in published] == ["Order:ord-1", "Order:ord-2", "Order:ord-3"]
    assert published[2].headers["trace"] == "abc"
    assert all(p.queue == entity_queue(p.headers["partition_key"]) for p in published)


def test_group_chord_and_chain_heads_are_routed(app: Celery, published: list[Published]) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(order_id: str) -> str:
        return order_id

    @app.task
    @partitioned(lambda args: GLOBAL_PARTITION_KEY, pool="global")
    def total(results: list[str]) -> None: ...

    keys = [f"ord-{i}" for i in range(8)]
    group(t.s(k) for k in keys).apply_async()
    chain(t.s("ord-100"), t.si("ord-101")).apply_async()
    chord([t.s("ord-200")], total.s()).apply_async()
    by_key = {p.headers["partition_key"]: p.queue for p in published}
    for k in [*keys, "ord-100", "ord-200"]:
        assert by_key[f"Order:{k}"] == entity_queue(f"Order:{k}")


def test_plain_tasks_are_untouched(app: Celery, published: list[Published]) -> None:
    @app.task
    def plain(x: int) -> None: ...

    plain.delay(1)
    plain.apply_async((2,), queue="elsewhere")
    assert [p.queue for p in published] == ["celery", "elsewhere"]
    assert "partition_key" not in published[0].headers


@pytest.mark.parametrize(
    "options",
    [{"queue": "other"}, {"routing_key": "x"}, {"priority": 5}, {"exchange": "elsewhere"}],
)
def test_fixed_destination_on_the_call_is_refused(app: Celery, published: list[Published],
                                                  options: dict[str, Any]) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(order_id: str) -> None: ...

    with pytest.raises(PartitionKeyError, match="may not set"):
        t.apply_async(("ord-1",), **options)
    assert published == []


def test_the_partitions_own_queue_is_allowed(app: Celery, published: list[Published]) -> None:
    """A retry re-published from the request's delivery info names the same queue."""
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(order_id: str) -> None: ...

    t.apply_async(("ord-1",), queue=entity_queue("Order:ord-1"))
    assert published[0].queue == entity_queue("Order:ord-1")


@pytest.mark.parametrize(
    ("key", "args", "match"),
    [
        (lambda a: None, ("o",), "returned None"),
        (lambda a: "", ("o",), "returned ''"),
        (lambda a: 42, ("o",), "returned 42"),
        (lambda a: a["missing"], ("o",), "raised KeyError"),
        (create_entity_partition_key("Order"), (None,), "argument 'order_id' is present but None"),
    ],
)
def test_bad_keys_fail_at_publish_naming_task_function_and_arguments(
    app: Celery, published: list[Published], key: Any, args: tuple[Any, ...], match: str
) -> None:
    @app.task
    @partitioned(key, pool="entity")
    def t(order_id: Any, extra: int = 0) -> None: ...

    with pytest.raises(PartitionKeyError) as err:
        t.apply_async(args)
    message = str(err.value)
    assert match in message and t.name in message and "(extra, order_id)" in message
    assert "nothing was published" in message
    assert published == []


def test_arguments_that_do_not_bind_are_a_key_error(app: Celery, published: list[Published]) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(order_id: str) -> None: ...

    with pytest.raises(PartitionKeyError, match="does not match its signature"):
        app.send_task(t.name, ("a", "b", "c"))
    assert published == []


def test_var_keyword_arguments_are_visible_to_key_functions(app: Celery, published: list[Published]) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(**event: Any) -> None: ...

    t.delay(order_id="ord-5", sku="x")
    assert published[0].headers["partition_key"] == "Order:ord-5"


def test_explain_route(app: Celery) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(order_id: str) -> None: ...

    route = cp.explain_route(app, t.name, "ord-123")
    assert (route.key, route.pool, route.index, route.queue) == (
        "Order:ord-123", "entity", partition_for("Order:ord-123", 10), entity_queue("Order:ord-123"),
    )
    with pytest.raises(PartitionKeyError, match="unknown task"):
        cp.explain_route(app, "nope")


def test_unknown_pool_refuses_to_publish(app: Celery, published: list[Published]) -> None:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="nosuch")
    def t(order_id: str) -> None: ...

    with pytest.raises(PartitionConfigError, match="unknown partition pool 'nosuch'"):
        t.delay("o")
    assert published == []


@pytest.mark.parametrize("bad", [None, "notcallable", 3])
def test_decorators_reject_bad_keys_when_declared(bad: Any) -> None:
    with pytest.raises(PartitionConfigError, match="key must be a function"):
        partitioned(bad, pool="entity")


def test_decorators_reject_bad_pools_and_names() -> None:
    with pytest.raises(PartitionConfigError, match="pool must be"):
        partitioned(lambda a: "k", pool="")
    with pytest.raises(PartitionConfigError, match="name must be"):
        projection("")
    with pytest.raises(PartitionConfigError, match="decorate a task function"):
        partitioned(lambda a: "k", pool="entity")(42)


def test_install_is_idempotent_and_keeps_other_routes(app: Celery) -> None:
    other = Celery(f"o{uuid.uuid4().hex[:6]}", broker="memory://")
    other.conf.task_routes = {"x.*": {"queue": "xq"}}
    first = cp.install(other)
    assert cp.install(other) is first
    routes = other.conf.task_routes
    assert routes[0] is first.router and routes[1] == {"x.*": {"queue": "xq"}}
