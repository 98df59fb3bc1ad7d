"""``publish_many`` on a transport it has no batch path for (kombu's in-memory one): one publish
per call through kombu's ``Producer``, in order, all or nothing on bad input. No broker needed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import celery_partitioning as cp
from celery_partitioning import PartitionKeyError, explain_route, partitioned, publish_many


@pytest.fixture
def app() -> Iterator[Celery]:
    ns = f"mem{uuid.uuid4().hex[:8]}"
    app = Celery(ns, broker="memory://", set_as_current=False)
    app.conf.update(partitioning_pools={"p": 3}, partitioning_queue_prefix=f"{ns}.partition",
                    task_default_queue=f"{ns}.plain")
    cp.install(app)

    @app.task(name=f"{ns}.keyed", shared=False)
    @partitioned(lambda args: f"K:{args['key']}", pool="p")
    def keyed(key: str, seq: int) -> None:
        return None

    @app.task(name=f"{ns}.plain", shared=False)
    def plain(n: int) -> None:
        return None

    app.finalize()
    yield app
    app.close()


def drain(app: Celery, queue: str) -> list[Any]:
    messages = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append(message)
    return messages


def test_calls_arrive_in_order_with_the_partition_headers(app: Celery) -> None:
    keyed, plain = app.tasks[f"{app.main}.keyed"], app.tasks[f"{app.main}.plain"]
    sigs = [keyed.s(f"k{i % 5}", i) for i in range(40)] + [plain.s(n) for n in range(3)]
    results = publish_many(sigs, app=app, chunk_size=7)
    assert len(results) == 43

    seen = []
    for index in range(3):
        queue = cp.state.settings_of(app).queue_name("p", index)
        for message in drain(app, queue):
            key, seq = message.decode()[0]
            assert message.headers["partition_key"] == f"K:{key}"
            assert message.headers["partition_index"] == index
            assert explain_route(app, keyed.name, key, seq).queue == queue
            seen.append(seq)
    for key in range(5):  # each key's calls in the order given
        mine = [s for s in seen if s % 5 == key]
        assert mine == sorted(mine) and len(mine) == 8
    assert [m.decode()[0] for m in drain(app, f"{app.main}.plain")] == [[0], [1], [2]]


def test_a_bad_call_publishes_nothing(app: Celery) -> None:
    keyed = app.tasks[f"{app.main}.keyed"]
    sigs = [keyed.s(f"k{i}", i) for i in range(10)]
    sigs.insert(6, keyed.s(seq=1))  # no key
    with pytest.raises(PartitionKeyError, match="call 6"):
        publish_many(sigs, app=app)
    for index in range(3):
        assert drain(app, cp.state.settings_of(app).queue_name("p", index)) == []
