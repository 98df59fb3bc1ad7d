"""``send_task`` by name from a process that never imported the task's module is still partitioned.

Each test writes a fresh package (a unique name, so it cannot have been imported before) whose
``tasks`` module declares a partitioned shared task, points a fresh app at it the way users
do (``imports`` or lazy ``autodiscover_tasks``), and publishes by name only.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals

import celery_partitioning as cp
from celery_partitioning import PartitionKeyError, partition_for

TASKS_MODULE = '''
from celery import shared_task

from celery_partitioning import create_entity_partition_key, partitioned


@shared_task
@partitioned(create_entity_partition_key("Order"), pool="entity")
def summary(order_id, qty=1):
    return qty
'''


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"shop_{uuid.uuid4().hex[:10]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "tasks.py").write_text(textwrap.dedent(TASKS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


@pytest.fixture
def published() -> Iterator[list[tuple[str, str, dict[str, Any]]]]:
    seen: list[tuple[str, str, dict[str, Any]]] = []

    def record(sender: str | None = None, routing_key: str | None = None,
               headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append((str(sender), routing_key or "", dict(headers or {})))

    signals.before_task_publish.connect(record, weak=False)
    yield seen
    signals.before_task_publish.disconnect(record)


def _app() -> Celery:
    app = Celery(f"d{uuid.uuid4().hex[:8]}", broker="memory://", backend="cache+memory://")
    app.conf.partitioning_pools = {"entity": 10}
    return app


@pytest.mark.parametrize("wiring", ["imports", "autodiscover_tasks"])
def test_send_task_by_name_imports_the_task_modules_once_then_routes_by_key(
        package: str, published: list[tuple[str, str, dict[str, Any]]], wiring: str) -> None:
    # Given an app that names its task modules but has not imported them
    app = _app()
    if wiring == "imports":
        app.conf.imports = (f"{package}.tasks",)
    else:
        app.autodiscover_tasks([package])  # lazy: runs when the task modules are imported
    cp.install(app)
    assert f"{package}.tasks" not in sys.modules

    # When a task of that module is published by name only
    app.send_task(f"{package}.tasks.summary", kwargs={"order_id": "ord-1"})

    # Then the module was imported and the message went to the key's partition queue
    assert f"{package}.tasks" in sys.modules
    index = partition_for("Order:ord-1", 10)
    [(task, queue, headers)] = published
    assert (task, queue) == (f"{package}.tasks.summary", f"partition.entity.{index}")
    assert headers["partition_key"] == "Order:ord-1"

    # and a bad key by name is refused like any other call
    with pytest.raises(PartitionKeyError, match="present but None"):
        app.send_task(f"{package}.tasks.summary", kwargs={"order_id": None})


def test_a_name_no_module_declares_stays_celerys(
        package: str, published: list[tuple[str, str, dict[str, Any]]]) -> None:
    app = _app()
    app.conf.imports = (f"{package}.tasks",)
    cp.install(app)

    app.send_task("billing.tasks.elsewhere", ("x",))  # a task another service runs

    assert published == [("billing.tasks.elsewhere", "celery", published[0][2])]
    assert "partition_key" not in published[0][2]
    assert f"{package}.tasks" in sys.modules  # looked for once, found nothing


def test_a_broken_task_module_fails_the_publish_loudly_every_time(
        package: str, tmp_path: Path, published: list[tuple[str, str, dict[str, Any]]]) -> None:
    (tmp_path / package / "tasks.py").write_text("raise RuntimeError('tasks module is broken')\n")
    app = _app()
    app.conf.imports = (f"{package}.tasks",)
    cp.install(app)

    for _ in range(2):
        with pytest.raises(RuntimeError, match="tasks module is broken"):
            app.send_task(f"{package}.tasks.summary", kwargs={"order_id": "ord-1"})
    assert published == []
