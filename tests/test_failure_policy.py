"""The failure policy ``on_failure="park" | "skip"``: decorator, setting, start-up validation."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

import celery_partitioning as cp
from celery_partitioning import PartitionConfigError, assert_valid_partition_keys
from celery_partitioning.config import read_settings
from celery_partitioning.tasks import spec_of
from celery_partitioning.worker.failures import DeadLetters


def make_app(**conf: Any) -> Celery:
    app = Celery(f"p{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    app.conf.update(partitioning_pools={"entity": 4}, **conf)
    cp.install(app)
    return app


def policy_in_worker(app: Celery, task: Any) -> str:
    """The policy the worker applies to a failure of ``task`` (DeadLetters.policy_of)."""
    runtime = SimpleNamespace(settings=read_settings(app.conf))
    store = SimpleNamespace(client=None, keys=None)
    return DeadLetters(runtime, store, None).policy_of(task)  # type: ignore[arg-type]


def test_the_setting_defaults_to_park_and_refuses_an_unknown_policy() -> None:
    assert read_settings({}).on_failure == "park"
    assert read_settings({"partitioning_on_failure": "skip"}).on_failure == "skip"
    with pytest.raises(PartitionConfigError) as err:
        read_settings({"partitioning_on_failure": "drop"})
    message = str(err.value)
    assert "partitioning_on_failure" in message and "CELERY_PARTITIONING_ON_FAILURE" in message
    assert "'drop'" in message and '"park"' in message and '"skip"' in message


@pytest.mark.parametrize("decorate", [
    lambda: cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity",
                           on_failure="drop"),
    lambda: cp.projection("orders", key=cp.create_entity_partition_key("Order"),
                          on_failure="ignore"),
])
def test_an_unknown_policy_is_refused_when_decorating(decorate: Any) -> None:
    with pytest.raises(PartitionConfigError, match=r"on_failure='(drop|ignore)' is not a failure"):
        decorate()


def test_each_task_gets_its_own_policy_else_the_setting() -> None:
    app = make_app(partitioning_on_failure="skip")

    @app.task(name="pol.parks", shared=False)
    @cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity", on_failure="park")
    def parks(order_id: str) -> None: ...

    @app.task(name="pol.default", shared=False)
    @cp.projection("orders", key=cp.create_entity_partition_key("Order"), pool="entity")
    def default(order_id: str) -> None: ...

    @app.task(name="pol.skips", shared=False)
    @cp.projection("rollup", key=cp.create_entity_partition_key("Order"), pool="entity",
                   on_failure="skip")
    def skips(order_id: str) -> None: ...

    assert_valid_partition_keys(app)
    assert [spec_of(app.tasks[n]).on_failure for n in ("pol.parks", "pol.default", "pol.skips")
            ] == ["park", None, "skip"]  # type: ignore[union-attr]
    assert [policy_in_worker(app, app.tasks[n]) for n in ("pol.parks", "pol.default", "pol.skips")
            ] == ["park", "skip", "skip"]
    assert policy_in_worker(make_app(), app.tasks["pol.default"]) == "park"


def test_start_up_validation_names_a_class_based_task_with_an_unknown_policy() -> None:
    app = make_app()

    class Bad(app.Task):  # type: ignore[name-defined,misc]
        name = "pol.bad_class"
        partition_key = staticmethod(cp.create_entity_partition_key("Order"))
        partition_pool = "entity"
        partition_on_failure = "retry-forever"

        def run(self, order_id: str) -> None: ...

    app.register_task(Bad())
    with pytest.raises(PartitionConfigError) as err:
        assert_valid_partition_keys(app)
    assert "task pol.bad_class: partition_on_failure='retry-forever' is not a failure policy" in (
        str(err.value))
