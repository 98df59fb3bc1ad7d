"""``celery_partitioning.testing``: the example of docs/testing.md runs as it stands through the
installed pytest plugin, and the assertions say what is wrong when they fail."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain

import celery_partitioning as cp
from celery_partitioning import PartitionKeyError, create_entity_partition_key, partition_for, partitioned
from celery_partitioning.testing import (
    RouteRecorder,
    assert_routes_to,
    assert_same_partition,
    route_of,
)

pytest_plugins = ("pytester",)

DOC = Path(__file__).resolve().parents[1] / "docs" / "testing.md"


def _example() -> str:
    text = DOC.read_text()
    section = text[text.index("## A complete example"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "docs/testing.md lost its example"
    return match.group(1)


def test_the_documented_example_passes_through_the_installed_plugin(pytester: pytest.Pytester) -> None:
    # Given the example test file of docs/testing.md, alone in a fresh directory
    pytester.makepyfile(test_orders=_example())
    # When pytest runs it in a new process (the plugin comes from the pytest11 entry point)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    # Then every test of it passes, the fixture included
    result.assert_outcomes(passed=4)


def test_the_in_process_example_of_the_docs_is_the_test_ci_runs() -> None:
    example = (DOC.parent.parent / "tests" / "test_docs_testing_example.py").read_text()
    section = DOC.read_text().split("### The example CI runs", 1)[1]
    assert f"```python\n{example}```" in section, "docs/testing.md and its example test differ"


def test_the_plugin_is_registered_under_its_name(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("celery_partitioning")
    assert plugin is not None and plugin.__name__ == "celery_partitioning.testing"


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery(f"t{uuid.uuid4().hex[:8]}", broker="memory://")
    app.conf.partitioning_pools = {"entity": 16}
    cp.install(app)
    yield app


def _tasks(app: Celery) -> tuple[Any, Any]:
    @app.task
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def added(order_id: str, qty: int = 1) -> None: ...

    @app.task
    def plain(x: int) -> None: ...

    return added, plain


def _two_keys_on_different_partitions() -> tuple[str, str]:
    first = partition_for("Order:a", 16)
    other = next(f"b{i}" for i in range(100) if partition_for(f"Order:b{i}", 16) != first)
    return "a", other


def test_assert_same_partition_lists_every_route_when_it_fails(app: Celery) -> None:
    added, _plain = _tasks(app)
    a, b = _two_keys_on_different_partitions()
    route = assert_same_partition(app, added.s(a), added.s(order_id=a, qty=3))
    assert route.key == f"Order:{a}"
    with pytest.raises(AssertionError) as err:
        assert_same_partition(app, added.s(a), added.s(b))
    message = str(err.value)
    assert "do not share a partition" in message
    assert f"key 'Order:{a}'" in message and f"key 'Order:{b}'" in message


def test_assert_routes_to_names_each_wrong_field(app: Celery) -> None:
    added, _plain = _tasks(app)
    index = partition_for("Order:o1", 16)
    assert_routes_to(app, added.s("o1"), key="Order:o1", pool="entity", index=index,
                     queue=f"partition.entity.{index}")
    with pytest.raises(AssertionError, match=r"key is 'Order:o1', expected 'Order:o2'; pool is 'entity', "
                                             r"expected 'global'"):
        assert_routes_to(app, added.s("o1"), key="Order:o2", pool="global")


def test_route_of_refuses_what_a_publish_refuses(app: Celery) -> None:
    added, plain = _tasks(app)
    with pytest.raises(PartitionKeyError, match="present but None"):
        route_of(app, added.s(None))
    with pytest.raises(PartitionKeyError, match="not partitioned"):
        route_of(app, plain.s(1))
    with pytest.raises(TypeError, match="signature"):
        route_of(app, "added")


def test_the_recorder_sees_published_and_eager_calls_in_order(app: Celery) -> None:
    added, plain = _tasks(app)
    with RouteRecorder() as recorder:
        added.delay("o1")                      # published (in-memory broker)
        plain.delay(1)                         # not partitioned: not recorded
        app.conf.task_always_eager = True
        added.delay("o2")                      # run in place
    added.delay("o3")                          # after disconnecting: not recorded
    assert recorder.keys() == ["Order:o1", "Order:o2"]
    assert [r.eager for r in recorder.routes] == [False, True]
    assert recorder.partitions(added.name) == [("entity", partition_for("Order:o1", 16)),
                                               ("entity", partition_for("Order:o2", 16))]


def test_an_eager_chain_is_not_routed_as_the_docs_say(app: Celery) -> None:
    added, _plain = _tasks(app)
    app.conf.task_always_eager = True
    # Celery runs an eager chain through Task.apply: the bad key is not seen (docs/testing.md)
    chain(added.si(None), added.si("o1")).apply_async()
    with pytest.raises(PartitionKeyError):
        added.si(None).apply_async()
