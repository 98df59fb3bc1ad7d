"""Eager mode (``task_always_eager``) rejects every call a real publish rejects, with the same words.

Each bad call is made twice on the same app: once published (kombu's in-memory transport) and
once eagerly; the eager run must raise the very error the publish raised, and run nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, Task, shared_task

import celery_partitioning as cp
from celery_partitioning import PartitionKeyError, create_entity_partition_key, partitioned


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery(f"e{uuid.uuid4().hex[:8]}", broker="memory://", backend="cache+memory://")
    app.conf.partitioning_pools = {"entity": 10, "global": 1}
    cp.install(app)
    yield app


def _declare(app: Celery, ran: list[Any]) -> Task:
    @app.task(bind=True)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def summary(self: Task, order_id: Any, qty: int = 1) -> int:
        ran.append((order_id, dict(self.request.headers or {})))
        return qty

    return summary


BAD_CALLS: dict[str, Callable[[Task], Any]] = {
    "key None": lambda t: t.delay(None),
    "key empty": lambda t: t.delay(""),
    "queue": lambda t: t.apply_async(("ord-1",), queue="celery"),
    "priority": lambda t: t.apply_async(("ord-1",), priority=5),
    "routing_key": lambda t: t.apply_async(("ord-1",), routing_key="celery"),
    "signature priority": lambda t: t.s("ord-1").apply_async(priority=3),
    "signature delay None": lambda t: t.s(None).delay(),
}


def _error_of(call: Callable[[], Any]) -> str:
    with pytest.raises(PartitionKeyError) as err:
        call()
    return str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_an_eager_call_raises_what_a_real_publish_raises(app: Celery, case: str) -> None:
    # Given a partitioned task and a bad call of it
    ran: list[Any] = []
    task = _declare(app, ran)
    call = BAD_CALLS[case]
    # When it is published for real, and then run eagerly
    published = _error_of(lambda: call(task))
    app.conf.task_always_eager = True
    eager = _error_of(lambda: call(task))
    # Then both raise the same PartitionKeyError, and the task body never ran
    assert eager == published
    assert "nothing was published" in eager
    assert ran == []


def test_a_call_that_does_not_fit_the_signature_is_a_type_error_in_both_modes(app: Celery) -> None:
    task = _declare(app, [])
    with pytest.raises(TypeError) as published:
        task.apply_async((), {"qty": 2})
    app.conf.task_always_eager = True
    with pytest.raises(TypeError) as eager:
        task.apply_async((), {"qty": 2})
    assert str(eager.value) == str(published.value)


def test_a_task_level_queue_is_refused_eagerly_as_when_published(app: Celery) -> None:
    @app.task(queue="celery")
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def fixed(order_id: str) -> None: ...

    published = _error_of(lambda: fixed.delay("ord-1"))
    app.conf.task_always_eager = True
    assert _error_of(lambda: fixed.delay("ord-1")) == published
    assert "queue='celery'" in published


def test_a_good_eager_call_runs_and_carries_the_route_it_would_take(app: Celery) -> None:
    ran: list[Any] = []
    task = _declare(app, ran)
    app.conf.task_always_eager = True

    assert task.delay("ord-7", qty=3).get() == 3

    [(order_id, headers)] = ran
    route = cp.explain_route(app, task.name, "ord-7", qty=3)
    assert order_id == "ord-7"
    assert headers["partition_key"] == route.key == "Order:ord-7"
    assert (headers["partition_pool"], headers["partition_index"], headers["partition_count"]) == (
        "entity", route.index, 10)


def test_plain_tasks_keep_every_option_in_eager_mode(app: Celery) -> None:
    @app.task
    def plain(x: int) -> int:
        return x * 2

    app.conf.task_always_eager = True
    assert plain.apply_async((4,), queue="celery", priority=5).get() == 8


def test_tasks_bound_before_install_and_created_after_finalize_are_checked() -> None:
    # Given an app whose tasks were bound before install(app) ran
    app = Celery(f"e{uuid.uuid4().hex[:8]}", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True

    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def early(order_id: Any) -> None: ...

    app.finalize()
    cp.install(app)

    # and a shared task declared once the app is finalized
    @shared_task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def late(order_id: Any) -> None: ...

    # Then both are validated eagerly
    for task in (app.tasks[early.name], app.tasks[late.name]):
        with pytest.raises(PartitionKeyError, match="present but None"):
            task.delay(None)
        with pytest.raises(PartitionKeyError, match="may not set priority=5"):
            task.apply_async(("ord-1",), priority=5)


def test_the_users_own_task_annotations_still_apply() -> None:
    around_calls: list[str] = []

    def count_calls(apply_async: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Task, *args: Any, **kwargs: Any) -> Any:
            around_calls.append(self.name)
            return apply_async(self, *args, **kwargs)
        return counted

    app = Celery(f"e{uuid.uuid4().hex[:8]}", broker="memory://", backend="cache+memory://")
    app.conf.task_annotations = [
        {"*": {"rate_limit": "10/s"}},
        {"shop.annotated": {"@apply_async": count_calls, "soft_time_limit": 7}},
    ]
    cp.install(app)

    @app.task(name="shop.annotated")
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def annotated(order_id: Any) -> None: ...

    app.conf.task_always_eager = True
    with pytest.raises(PartitionKeyError):
        annotated.delay(None)
    annotated.delay("ord-1")
    assert annotated.soft_time_limit == 7 and annotated.rate_limit == "10/s"
    assert around_calls == ["shop.annotated", "shop.annotated"]


def test_install_before_the_app_is_configured_covers_eager_mode_from_its_config() -> None:
    # Given the wiring of the quick start: install, then the config (Django settings) is read
    app = Celery(f"e{uuid.uuid4().hex[:8]}", broker="memory://", backend="cache+memory://")
    cp.install(app)
    assert not app.configured
    app.config_from_object({"task_always_eager": True, "task_annotations": {"*": {"acks_late": True}}})

    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def t(order_id: Any) -> str:
        return str(order_id)

    # Then eager calls are validated, and good ones run
    with pytest.raises(PartitionKeyError, match="may not set queue='celery'"):
        t.apply_async(("ord-1",), queue="celery")
    assert t.delay("ord-1").get() == "ord-1"
    assert t.acks_late is True
