"""Settings (one reader, named errors) and start-up validation (every offender at once)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery

import celery_partitioning as cp
from celery_partitioning import (
    GLOBAL_PARTITION_KEY,
    PartitionConfigError,
    assert_valid_partition_keys,
    create_entity_partition_key,
    partitioned,
    projection,
)
from celery_partitioning.config import read_settings


def test_defaults() -> None:
    settings = read_settings({})
    assert dict(settings.pools) == {"entity": 10, "customer": 5, "saga": 5, "global": 1, "dcb": 5}
    assert settings.queue_prefix == "partition"
    assert settings.lease_ttl == 10.0
    assert settings.queue_name("entity", 3) == "partition.entity.3"


def test_redis_url_falls_back_to_the_broker_then_the_backend() -> None:
    assert read_settings({"broker_url": "redis://h:1/2"}).redis_url == "redis://h:1/2"
    assert read_settings({"broker_url": "amqp://x", "result_backend": "redis://b/1"}).redis_url == "redis://b/1"
    assert read_settings({"broker_url": "amqp://x"}).redis_url is None
    assert read_settings({"partitioning_redis_url": "redis://s/3", "broker_url": "redis://h"}).redis_url == (
        "redis://s/3"
    )


@pytest.mark.parametrize(
    ("setting", "value", "match"),
    [
        ("partitioning_pools", {}, "non-empty mapping"),
        ("partitioning_pools", ["entity"], "non-empty mapping"),
        ("partitioning_pools", {"entity": 0}, "partition count 0"),
        ("partitioning_pools", {"entity": True}, "partition count True"),
        ("partitioning_pools", {"entity": "3"}, "partition count '3'"),
        ("partitioning_pools", {"bad.name": 3}, "invalid pool name"),
        ("partitioning_pools", {"e": 5000}, "from 1 to 4096"),
        ("partitioning_queue_prefix", "", "partitioning_queue_prefix"),
        ("partitioning_queue_prefix", "has space", "partitioning_queue_prefix"),
        ("partitioning_lease_ttl", 0, "partitioning_lease_ttl"),
        ("partitioning_lease_ttl", "10", "partitioning_lease_ttl"),
        ("partitioning_redis_url", "amqp://x", "redis://"),
    ],
)
def test_bad_settings_name_the_setting_and_the_fix(setting: str, value: Any, match: str) -> None:
    with pytest.raises(PartitionConfigError) as err:
        read_settings({setting: value})
    message = str(err.value)
    assert match in message and setting in message and "CELERY_" + setting.upper() in message


def make_app(**conf: Any) -> Celery:
    app = Celery(f"v{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    app.conf.update(partitioning_pools={"entity": 4, "global": 1}, **conf)
    cp.install(app)
    return app


def register_misconfigured(app: Celery) -> None:
    @app.task(name="bad.no_key", shared=False)
    @projection("orderSummary")
    def no_key(order_id: str) -> None: ...

    @app.task(name="bad.unknown_pool", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="customer")
    def unknown_pool(order_id: str) -> None: ...

    @app.task(name="bad.fixed_queue", queue="fast", shared=False)
    @partitioned(lambda a: GLOBAL_PARTITION_KEY, pool="global")
    def fixed_queue() -> None: ...

    @app.task(name="bad.routed", shared=False)
    @partitioned(lambda a: GLOBAL_PARTITION_KEY, pool="global")
    def routed() -> None: ...

    @app.task(name="bad.no_pool", shared=False)
    @projection("rollup", key=lambda a: GLOBAL_PARTITION_KEY)
    def no_pool() -> None: ...

    @app.task(name="good.one", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def good(order_id: str) -> None: ...


def test_every_offender_is_listed_at_once() -> None:
    app = make_app(task_routes={"bad.routed": {"queue": "elsewhere"}})
    register_misconfigured(app)
    with pytest.raises(PartitionConfigError) as err:
        assert_valid_partition_keys(app)
    message = str(err.value)
    assert "6 partitioning problem(s)" in message
    for fragment in [
        "projection 'orderSummary' (task bad.no_key): has no partition key",
        "task bad.unknown_pool: unknown pool 'customer'",
        "task bad.fixed_queue: sets queue='fast'",
        "task bad.routed: task_routes sends it to",
        "projection 'rollup' (task bad.no_pool): has no pool",
    ]:
        assert fragment in message
    assert "good.one" not in message


def test_an_iterable_of_tasks_can_be_validated() -> None:
    app = make_app()
    register_misconfigured(app)
    assert_valid_partition_keys([app.tasks["good.one"]])
    with pytest.raises(PartitionConfigError, match="2 partitioning problem"):
        assert_valid_partition_keys([app.tasks["good.one"], app.tasks["bad.no_key"]])


def test_default_priority_is_reported() -> None:
    app = make_app(task_default_priority=5)
    with pytest.raises(PartitionConfigError, match="task_default_priority"):
        assert_valid_partition_keys(app)


def test_an_invalid_registry_blocks_publishing_after_finalize(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    register_misconfigured(app)
    app.finalize()
    assert "5 partitioning problem(s)" in caplog.text
    with pytest.raises(PartitionConfigError, match="5 partitioning problem"):
        app.tasks["good.one"].delay("o-1")


def test_a_valid_registry_passes() -> None:
    app = make_app()

    @app.task(shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def fine(order_id: str) -> None: ...

    assert_valid_partition_keys(app)


def test_rate_and_time_limits_on_partitioned_tasks_are_refused_naming_task_and_option() -> None:
    # Given partitioned tasks with a rate limit, a hard and a soft time limit, and plain tasks
    # with the same options (a plain worker honours them)
    app = make_app()

    @app.task(name="lim.rate", rate_limit="10/s", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def rated(order_id: str) -> None: ...

    @app.task(name="lim.hard", time_limit=30, shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def hard(order_id: str) -> None: ...

    @app.task(name="lim.soft", soft_time_limit=5, shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def soft(order_id: str) -> None: ...

    @app.task(name="lim.none", rate_limit=0, shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def unlimited(order_id: str) -> None: ...

    @app.task(name="plain.limited", rate_limit="1/s", time_limit=3, soft_time_limit=2, shared=False)
    def plain() -> None: ...

    # Then validation lists the three, each with its option and why
    with pytest.raises(PartitionConfigError) as err:
        assert_valid_partition_keys(app)
    message = str(err.value)
    assert "3 partitioning problem(s)" in message, message
    assert "task lim.rate: sets rate_limit='10/s': a rate limit holds" in message
    assert "task lim.hard: sets time_limit=30: a partitioned task runs in a partition thread" in message
    assert "task lim.soft: sets soft_time_limit=5:" in message
    assert "lim.none" not in message and "plain.limited" not in message


def test_limits_from_app_settings_name_the_setting_and_the_per_task_way_out() -> None:
    app = make_app(task_default_rate_limit="100/m", task_soft_time_limit=60)

    @app.task(name="lim.inherits", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def inherits(order_id: str) -> None: ...

    @app.task(name="lim.opts_out", rate_limit=0, soft_time_limit=0, shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def opts_out(order_id: str) -> None: ...

    with pytest.raises(PartitionConfigError) as err:
        assert_valid_partition_keys(app)
    message = str(err.value)
    assert "2 partitioning problem(s)" in message, message
    assert ("task lim.inherits: sets rate_limit='100/m' (from the setting task_default_rate_limit; "
            "give the task rate_limit=0 to keep it for other tasks)") in message
    assert "soft_time_limit=60 (from the setting task_soft_time_limit;" in message
    assert "opts_out" not in message
